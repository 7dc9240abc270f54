"""exit-curve: thresholds come from calibration data only; the verdict decides from the speed-ups measured whether
early exit pays and which stripped branch to ship instead; bad values are refused, on the command line as one line
with exit status 2; the CLI runs end to end on an ImageFolder."""
import json
import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_sila, image_folder
from timm_sila_cli import main
from timm_sila.exits.calibration import TEMPERATURE_BOUNDS, simulate_exits
from timm_sila.exits.early_exit import EarlyExit
from timm_sila.exits.curve import SlowerThanBaseWarning, exit_curve, exit_verdict, measure_speedup
from timm_sila_cli.exit_curve import format_curve

NAN, INF = float('nan'), float('inf')


def _loader(seed, n=24, batch=8):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.fixture(scope='module')
def model():
    return build_sila('resnet18', 4)[0].eval()


def test_curve_rows_and_calibration_only_thresholds(model):
    a = exit_curve(model, _loader(0), _loader(1), points=4, timed=2, repeats=1)
    b = exit_curve(model, _loader(0), _loader(2), points=4, timed=2, repeats=1)
    assert [r['threshold'] for r in a['rows']] == [r['threshold'] for r in b['rows']]
    assert a['temperatures'] == b['temperatures']
    assert sum(r['chosen'] for r in a['rows']) == 1
    assert all(0 < r['compute'] <= 1 + 1e-9 for r in a['rows'])
    assert sum(sum(r['exits'].values()) == 24 for r in a['rows']) == len(a['rows'])
    timed = [r for r in a['rows'] if 'speedup' in r]
    assert len(timed) >= min(2, len(a['rows'])) and any(r['chosen'] for r in timed) and all(
        math.isfinite(r['speedup']) and 0.05 < r['speedup'] < 20 for r in timed)
    for r in timed:  # the routed forward's counted compute agrees with the offline simulation
        assert r['measured_compute'] == pytest.approx(
            simulate_exits(torch.stack(model.forward_branches(torch.cat([x for x, _ in _loader(1)])), 1),
                           torch.zeros(24, dtype=torch.long), [r['threshold']] * 2, a['temperatures'],
                           a['segment_macs'])['compute'], rel=1e-6)


def test_cli_end_to_end(tmp_path, capsys):
    image_folder(tmp_path / 'data', classes=('a', 'b'), n=6, splits=('val', 'test'))
    model = build_sila('resnet18', 2)[0]
    save_file(model.state_dict(), str(tmp_path / 'sila.safetensors'))
    args = ['exit-curve', '--model', 'sila_resnet18', '--checkpoint', str(tmp_path / 'sila.safetensors'),
            '--data-dir', str(tmp_path / 'data'), '--calib-split', 'val', '--num-classes', '2', '--img-size', '32',
            '--batch-size', '4', '--points', '4', '--json', '--save', str(tmp_path / 'exit.safetensors')]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['eval_samples'] == 12 and result['calib_samples'] == 12
    assert (tmp_path / 'exit.safetensors').is_file()
    verdict = result['verdict']
    assert verdict['ship'] in ('early-exit', 'branch', 'base') and verdict['message'].startswith('Early exit')
    assert [b['branch'] for b in result['branches']] == [1, 2]
    bad = args[:args.index('--calib-split') + 1] + ['test'] + args[args.index('--calib-split') + 2:]
    assert main(bad) == 2
    assert 'never chosen on the test data' in capsys.readouterr().err


@pytest.fixture(scope='module')
def small():
    return build_sila('test_resnet', 4)[0].eval()


@pytest.mark.parametrize('points', [1, 3, 5])
def test_points_rows_one_chosen_no_duplicates(small, points):
    result = exit_curve(small, _loader(0, n=48), _loader(1), points=points, timed=0, repeats=1)
    rows = result['rows']
    assert len(rows) == points
    assert sum(r['chosen'] for r in rows) == 1
    assert len({r['threshold'] for r in rows}) == points
    printed = [line.split()[0] for line in format_curve(result).splitlines()[2:2 + points]]
    assert len(set(printed)) == points, 'every printed threshold must be told apart'


def test_untrained_model_temperature_is_bounded_with_a_warning(small):
    with pytest.warns(UserWarning, match=r'outside \[0.05, 20.0\]'):
        result = exit_curve(small, _loader(0), _loader(1), points=3, timed=0, repeats=1)
    assert all(TEMPERATURE_BOUNDS[0] <= t <= TEMPERATURE_BOUNDS[1] for t in result['temperatures'])
    assert max(result['temperatures']) == TEMPERATURE_BOUNDS[1] and result['warnings']


def test_progress_goes_to_stderr_and_json_stays_clean(small, capsys):
    exit_curve(small, _loader(0), _loader(1), points=2, timed=0, repeats=1,
               progress=lambda line: print(f'exit-curve: {line}', file=sys.stderr))
    captured = capsys.readouterr()
    assert captured.out == ''
    assert 'exit-curve: calibration logits: 1/3 batches (8 images)' in captured.err
    assert 'exit-curve: calibration logits: 3/3 batches (24 images)' in captured.err
    assert 'exit-curve: evaluation logits: 3/3 batches' in captured.err


# --- the verdict: does early exit pay, measured, and which stripped branch is faster within the drop --------------
def _point(speedup, calib_drop, compute=0.8, drop=None, chosen=False, threshold=0.5):
    return dict(threshold=threshold, speedup=speedup, calib_drop=calib_drop, compute=compute,
                drop=calib_drop if drop is None else drop, chosen=chosen)


def _branch(k, calib_drop, speedup=None, drop=None):
    entry = dict(branch=k, calib_drop=calib_drop, drop=calib_drop if drop is None else drop)
    return entry if speedup is None else dict(entry, speedup=speedup)


# (points, branches, max_drop) -> (pays, ship, named branch, best speed-up, fragments of the message)
VERDICTS = {
    'slower than the base model, no branch within the drop': (
        [_point(0.93, 0.7, compute=0.92, chosen=True), _point(0.91, 0.0, compute=0.97)],
        [_branch(1, 2.16), _branch(2, 16.45)], 1.0,
        (False, 'base', None, 0.93, ['does not pay', 'fastest runs at 0.93x', 'branch 1 2.16, branch 2 16.45',
                                     'ship the base model'])),
    'slower than the base model, a branch within the drop is faster': (
        [_point(0.93, 0.7, chosen=True)], [_branch(1, 0.4, 1.4), _branch(2, 3.0)], 1.0,
        (False, 'branch', 1, 0.93, ['does not pay', 'Ship stripped branch 1 instead: 1.40x',
                                    'timm-sila strip --branch 1'])),
    'the fastest branch within the drop is named, a faster one beyond it is not': (
        [_point(0.9, 0.5, chosen=True)], [_branch(1, 0.2, 1.2), _branch(2, 0.9, 1.5), _branch(3, 1.1, 3.0)], 1.0,
        (False, 'branch', 2, 0.9, ['Ship stripped branch 2 instead'])),
    'a branch within the drop but no faster either': (
        [_point(0.9, 0.5, chosen=True)], [_branch(1, 0.3, 0.98)], 1.0,
        (False, 'base', 1, 0.9, ['does not pay', 'branch 1) runs at 0.98x', 'ship the base model'])),
    'early exit pays': (
        [_point(1.3, 0.8, chosen=True), _point(1.1, 0.2)], [_branch(1, 2.0)], 1.0,
        (True, 'early-exit', None, 1.3, ['Early exit pays: threshold 0.5 runs at 1.30x'])),
    'early exit pays, a stripped branch is faster still': (
        [_point(1.2, 0.8, chosen=True)], [_branch(1, 0.5, 1.6)], 1.0,
        (True, 'branch', 1, 1.2, ['Early exit pays', 'Faster still: stripped branch 1 runs at 1.60x'])),
    'a fast point beyond the drop does not count': (
        [_point(2.0, 5.0), _point(0.95, 0.9, chosen=True)], [], 1.0,
        (False, 'base', None, 0.95, ['does not pay'])),
    'no sample leaves early: a ratio above 1 is noise': (
        [_point(1.04, 0.0, compute=1.0, chosen=True)], [_branch(1, 30.0)], 1.0,
        (False, 'base', None, 1.04, ['does not pay', 'with no sample leaving early'])),
    'the chosen point is slower than another within the drop': (
        [_point(0.97, 1.0, compute=0.9, chosen=True, threshold=0.6), _point(1.1, 0.3, compute=0.95)], [], 1.0,
        (True, 'early-exit', None, 1.1, ['threshold 0.6) runs at 0.97x: use the faster one'])),
    'the evaluation drop is reported, never used to select': (
        [_point(1.2, 0.5, drop=4.0, chosen=True)], [_branch(1, 0.5, 1.1, drop=6.0)], 1.0,
        (True, 'early-exit', 1, 1.2, ['4.00 points drop on the evaluation data (0.50 on the calibration'])),
    'per-exit thresholds are named as such': (
        [dict(thresholds=[0.7, 0.65], speedup=1.1, calib_drop=0.2, compute=0.9, drop=0.3)], [], 1.0,
        (True, 'early-exit', None, 1.1, ['per-exit thresholds [0.7, 0.65] runs at 1.10x'])),
}


@pytest.mark.parametrize('points,branches,max_drop,expected', VERDICTS.values(), ids=VERDICTS.keys())
def test_verdict_decides_from_measured_speedups(points, branches, max_drop, expected):
    pays, ship, branch, best, fragments = expected
    verdict = exit_verdict(points, branches, max_drop)
    assert verdict['pays'] is pays and verdict['ship'] == ship
    assert (verdict['branch'] or {}).get('branch') == branch
    assert verdict['best_speedup'] == best
    for fragment in fragments:
        assert fragment in verdict['message'], verdict['message']
    assert json.loads(json.dumps(verdict)) == verdict


def _cannot_pay(num_classes=2):
    """A SilaNet whose early exits can only cost accuracy: every auxiliary head answers uniform logits (class 0, the
    same confidence for every sample) and the base head always answers class 1, the label of most samples."""
    net = build_sila('test_resnet', num_classes)[0].eval()
    with torch.no_grad():
        for head in net.heads.values():
            head.weight.zero_()
            head.bias.zero_()
        fc = net.base.get_classifier()
        fc.weight.zero_()
        fc.bias.copy_(torch.tensor([-5.0, 5.0]))
    return net


def _mostly_ones(seed, n=24, batch=8):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 6 != 0).long()  # 5 in 6 samples are class 1
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), labels)
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.fixture(scope='module')
def cannot_pay():
    return _cannot_pay()


def test_curve_that_cannot_pay_says_so(cannot_pay):
    """Every exit costs 66.7 points here, so within 1 point nobody leaves early: whatever the clock says, the verdict
    is that early exit does not pay, no branch is within the drop, and the base model is what to ship."""
    with pytest.warns(SlowerThanBaseWarning, match='Early exit does not pay') as caught:
        result = exit_curve(cannot_pay, _mostly_ones(0), _mostly_ones(1), points=3, timed=2, repeats=1)
    verdict = result['verdict']
    assert verdict['pays'] is False and verdict['ship'] == 'base' and verdict['branch'] is None
    assert verdict['best']['compute'] == 1.0 and verdict['best']['calib_drop'] == 0.0
    assert verdict['chosen_speedup'] == next(r['speedup'] for r in result['rows'] if r['chosen'])
    assert [(b['branch'], 'speedup' in b, b['within']) for b in result['branches']] == [(1, False, False),
                                                                                       (2, False, False)]
    assert all(b['calib_drop'] == pytest.approx(200 / 3) for b in result['branches'])
    assert 'No stripped branch is within the drop either' in verdict['message']
    assert verdict['message'] in result['warnings'] and str(caught[-1].message) == verdict['message']
    lines = format_curve(result).splitlines()
    assert lines[-1] == f"verdict: {verdict['message']}"
    assert 'stripped branch 1: calibration drop 66.67, drop 66.67, compute' in format_curve(result)
    assert json.loads(json.dumps(result))['verdict'] == verdict


def test_named_branch_is_the_fastest_within_the_drop(cannot_pay):
    """With a drop of 100 points every branch is within it: each is stripped and timed against the base model, and
    the verdict names the fastest, from the numbers measured in this run."""
    result = exit_curve(cannot_pay, _mostly_ones(0), _mostly_ones(1), points=3, timed=2, repeats=1, max_drop=100.0)
    branches = result['branches']
    assert [b['branch'] for b in branches] == [1, 2] and all(b['within'] for b in branches)
    assert all(math.isfinite(b['speedup']) and b['speedup'] > 0 for b in branches)
    seg = result['segment_macs']
    assert [b['compute'] for b in branches] == pytest.approx([sum(seg[:2]) / sum(seg), seg[0] / sum(seg)])
    verdict = result['verdict']
    fastest = max(branches, key=lambda b: b['speedup'])
    assert verdict['branch']['branch'] == fastest['branch'] and verdict['branch']['speedup'] == fastest['speedup']
    assert {'drop', 'calib_drop'} <= set(verdict['branch'])
    timed = [r for r in result['rows'] if 'speedup' in r] + [result['per_exit']]
    assert verdict == exit_verdict(timed, branches, 100.0)  # every measured point took part in the decision
    assert verdict['best_speedup'] == max(p['speedup'] for p in timed if p['compute'] < 1)


def test_measure_speedup_contract(cannot_pay):
    batches = [x for x, _ in _mostly_ones(0)]
    ee = EarlyExit(cannot_pay, thresholds=0.5, input_size=(3, 32, 32))  # every sample leaves at the first exit
    ratio = measure_speedup(ee, None, batches, repeats=1)  # None: the EarlyExit's own base model
    assert math.isfinite(ratio) and ratio > 0
    with pytest.raises(ValueError, match='base model'):
        measure_speedup(cannot_pay.base, None, batches)
    with pytest.raises(ValueError, match='non-empty batch'):
        measure_speedup(ee, None, [torch.zeros(0, 3, 32, 32)])
    with pytest.raises(ValueError, match='repeats'):
        measure_speedup(ee, None, batches, repeats=0)


def test_cli_table_ends_with_the_verdict(cannot_pay, tmp_path, capsys):
    """One image of class a for five of class b: the base head (always b) is right on 5/6, every exit (a) on 1/6."""
    image_folder(tmp_path / 'data', classes=('a', 'b'), n={'a': 1, 'b': 5}, splits=('val', 'test'))
    save_file(cannot_pay.state_dict(), str(tmp_path / 'sila.safetensors'))
    args = ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(tmp_path / 'sila.safetensors'),
            '--data-dir', str(tmp_path / 'data'), '--calib-split', 'val', '--num-classes', '2', '--img-size', '32',
            '--batch-size', '3', '--points', '3']
    assert main(args) == 0
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1]
    assert last.startswith('verdict: Early exit does not pay') and 'ship the base model (branch 0)' in last
    assert 'timm-sila exit-curve: warning: Early exit does not pay' in captured.err
    assert main(args + ['--json']) == 0
    verdict = json.loads(capsys.readouterr().out)['verdict']
    assert verdict['pays'] is False and verdict['ship'] == 'base' and verdict['branch'] is None
    assert verdict['message'].startswith('Early exit does not pay')  # its measured ratios differ from run to run


# --- bad values: refused by exit_curve, one line with exit status 2 on the command line -------------------------
@pytest.fixture(scope='module')
def binary():
    return build_sila('test_resnet', 2)[0].eval()


def _binary_loader(n, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                                          torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


BAD_CURVE_ARGS = {
    'max_drop nan': (dict(max_drop=NAN), 16, 'max_drop'),
    'max_drop inf': (dict(max_drop=INF), 16, 'max_drop'),
    'max_drop negative': (dict(max_drop=-1.0), 16, 'max_drop'),
    'max_drop an integer beyond float': (dict(max_drop=10 ** 400), 16, 'max_drop must be a finite number'),
    'points 0': (dict(points=0), 16, 'points'),
    'points 2.0': (dict(points=2.0), 16, 'points must be an integer'),
    'timed 2.5': (dict(timed=2.5), 16, 'timed must be an integer'),
    'timed "2"': (dict(timed='2'), 16, 'timed must be an integer'),
    'timed -1': (dict(timed=-1), 16, 'timed must be an integer >= 0'),
    'repeats True': (dict(repeats=True), 16, 'repeats must be an integer'),
    'repeats 0': (dict(repeats=0), 16, 'repeats must be an integer >= 1'),
    'empty calibration set': ({}, 0, 'calibration set is empty'),
}


@pytest.mark.parametrize('kwargs,calib_size,match', BAD_CURVE_ARGS.values(), ids=BAD_CURVE_ARGS.keys())
def test_exit_curve_bad_values(binary, kwargs, calib_size, match):
    with pytest.raises(ValueError, match=match):
        exit_curve(binary, _binary_loader(calib_size), _binary_loader(8, seed=1), **dict(dict(timed=0), **kwargs))


@pytest.fixture(scope='module')
def cli_inputs(binary, tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    image_folder(root / 'data', classes=('a', 'b'), n=4, splits=('val', 'test'))
    for c in ('a', 'b'):
        (root / 'data' / 'empty' / c).mkdir(parents=True)
    save_file(binary.state_dict(), str(root / 'sila.safetensors'))
    return root


BAD_CLI = {  # name: (extra arguments, what the one line must say)
    '--max-drop nan': (['--max-drop', 'nan'], "--max-drop: expected a finite number >= 0, got 'nan'"),
    '--max-drop inf': (['--max-drop', 'inf'], "--max-drop: expected a finite number >= 0, got 'inf'"),
    '--calib-limit 0': (['--calib-limit', '0'], "--calib-limit: expected an integer >= 1, got '0'"),
    '--points 0': (['--points', '0'], "--points: expected an integer >= 1, got '0'"),
    '--batch-size 0': (['--batch-size', '0'], "--batch-size: expected an integer >= 1, got '0'"),
    'empty calibration set': (['--calib-split', 'empty'], 'empty'),
    'calibration on the test split': (['--calib-split', 'test'], '--calib-split must differ from --split'),
}


@pytest.mark.parametrize('extra,fragment', BAD_CLI.values(), ids=BAD_CLI.keys())
def test_exit_curve_cli_bad_values_are_one_line(cli_inputs, extra, fragment, capsys):
    args = ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(cli_inputs / 'sila.safetensors'),
            '--data-dir', str(cli_inputs / 'data'), '--calib-split', 'val', '--num-classes', '2',
            '--img-size', '32', '--batch-size', '4', '--json'] + extra
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'error' in lines[0] and fragment in lines[0], captured.err


def test_exit_curve_cli_progress_and_warnings_stay_off_stdout(cli_inputs, capsys):
    args = ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(cli_inputs / 'sila.safetensors'),
            '--data-dir', str(cli_inputs / 'data'), '--calib-split', 'val', '--num-classes', '2',
            '--img-size', '32', '--batch-size', '4', '--points', '3', '--json']
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result['rows']) <= 3 and sum(r['chosen'] for r in result['rows']) == 1
    assert 'exit-curve: calibration logits: 2/2 batches (8 images)' in captured.err
    assert all(line.startswith(('exit-curve:', 'timm-sila exit-curve: warning:')) for line in
               captured.err.strip().splitlines()), captured.err
