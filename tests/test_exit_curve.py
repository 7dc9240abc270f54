"""exit-curve: thresholds come from calibration data only; the CLI runs end to end on an ImageFolder."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import timm
from safetensors.torch import save_file

from timm_sila.cli import main
from timm_sila.exit_calibration import TEMPERATURE_BOUNDS, calibrate_temperatures, simulate_exits
from timm_sila.exit_curve import exit_curve, format_curve


def _loader(seed, n=24, batch=8):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('sila_resnet18', num_classes=4).eval()


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


def _image_folder(root, n=6):
    g = torch.Generator().manual_seed(0)
    for split in ('val', 'test'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(px).save(root / split / c / f'{i}.png')


def test_cli_end_to_end(tmp_path, capsys):
    _image_folder(tmp_path / 'data')
    torch.manual_seed(0)
    model = timm.create_model('sila_resnet18', num_classes=2)
    save_file(model.state_dict(), str(tmp_path / 'sila.safetensors'))
    args = ['exit-curve', '--model', 'sila_resnet18', '--checkpoint', str(tmp_path / 'sila.safetensors'),
            '--data-dir', str(tmp_path / 'data'), '--calib-split', 'val', '--num-classes', '2', '--img-size', '32',
            '--batch-size', '4', '--points', '4', '--json', '--save', str(tmp_path / 'exit.safetensors')]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['eval_samples'] == 12 and result['calib_samples'] == 12
    assert (tmp_path / 'exit.safetensors').is_file()
    bad = args[:args.index('--calib-split') + 1] + ['test'] + args[args.index('--calib-split') + 2:]
    assert main(bad) == 2
    assert 'never chosen on the test data' in capsys.readouterr().err


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return timm.create_model('sila_test_resnet', num_classes=4).eval()


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


def test_temperature_bounds_clamp_the_fit():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (500,), generator=g)
    noise = torch.randn(500, 1, 5, generator=g)  # logits unrelated to the labels: free fit T -> infinity
    with pytest.warns(UserWarning, match='set 0'):
        assert calibrate_temperatures(noise, labels) == [TEMPERATURE_BOUNDS[1]]
    timid = 0.01 * F.one_hot(labels, 5).float()[:, None]  # always right but 100-fold underconfident: T -> 0
    with pytest.warns(UserWarning, match='set 0'):
        assert calibrate_temperatures(timid, labels) == [TEMPERATURE_BOUNDS[0]]


def test_progress_goes_to_stderr_and_json_stays_clean(small, capsys):
    exit_curve(small, _loader(0), _loader(1), points=2, timed=0, repeats=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ''
    assert 'exit-curve: calibration logits: 1/3 batches (8 images)' in captured.err
    assert 'exit-curve: calibration logits: 3/3 batches (24 images)' in captured.err
    assert 'exit-curve: evaluation logits: 3/3 batches' in captured.err
