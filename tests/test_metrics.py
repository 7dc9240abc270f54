"""read_eval_metrics(): the one reader of `timm-sila eval --json` results, range-checked before a card or a table.

Every hostile case is refused by the reader itself and by both of its consumers (bench's table, the model card),
and on the command line as one line, exit status 2, nothing written.
"""
import json
import math
import os
import re

import pytest
import torch

from conftest import build_sila
from timm_sila import load_stripped, strip
from timm_sila.measure.bench import bench_branches
from timm_sila.io.trust import FILE_LIMITS
from timm_sila.measure.metrics import MetricsError, check_params, read_eval_metrics

MAX_JSON_DEPTH = int(FILE_LIMITS['json_depth'].hi)
MAX_METRICS_BYTES = int(FILE_LIMITS['json_bytes'].hi)
from timm_sila.ship.strip import model_card
from timm_sila.measure.sizes import count_params
from timm_sila_cli import main

GOOD = dict(num_samples=12, split='test', topk=2,
            branches=[dict(branch=0, top1=50.0, top2=100.0, loss=0.69, params=372594),
                      dict(branch=1, top1=41.67, top2=91.67, loss=0.7, params=108018)],
            ensemble=dict(top1=50.0, top2=100.0, loss=0.69))


def _with(branch=None, **top):
    """GOOD with top-level keys replaced, or with branch 1's row updated by `branch`."""
    out = json.loads(json.dumps(GOOD))
    out.update(top)
    if branch is not None:
        out['branches'][1].update(branch)
    return out


# (id, the document (dict) or raw file text (str / bytes), fragment of the error)
CASES = [
    ('top1-250', _with(branch=dict(top1=250.0)), 'top1 = 250.0'),
    ('top5-minus-1e308', _with(branch=dict(top2=-1e308)), 'top2 = -1e+308'),
    ('top1-negative', _with(branch=dict(top1=-0.5)), 'top1 = -0.5'),
    ('top1-string', _with(branch=dict(top1='99')), "top1 = '99'"),
    ('top1-bool', _with(branch=dict(top1=True)), 'top1 = True'),
    ('top1-missing', _with(branch=dict(top1=None)), 'no top1'),
    ('topk-falls', _with(branch=dict(top1=60.0, top2=50.0)), 'top2 = 50 below top1 = 60'),
    ('loss-infinite', '{"num_samples": 3, "branches": [{"branch": 1, "top1": 1.0, "loss": Infinity}]}',
     'loss = inf'),
    ('loss-nan', '{"num_samples": 3, "branches": [{"branch": 1, "top1": 1.0, "loss": NaN}]}', 'loss = nan'),
    ('loss-negative', _with(branch=dict(loss=-1.0)), 'loss = -1.0'),
    ('loss-1e400', '{"num_samples": 3, "branches": [{"branch": 1, "top1": 1.0, "loss": 1e400}]}', 'loss = inf'),
    ('params-float', _with(branch=dict(params=108018.0)), 'params = 108018.0'),
    ('params-bool', _with(branch=dict(params=True)), 'params = True'),
    ('params-negative', _with(branch=dict(params=-5)), 'params = -5'),
    ('num-samples-zero', _with(num_samples=0), 'num_samples = 0'),
    ('num-samples-float', _with(num_samples=12.0), 'num_samples = 12.0'),
    ('num-samples-bool', _with(num_samples=True), 'num_samples = True'),
    ('num-samples-missing', {k: v for k, v in GOOD.items() if k != 'num_samples'}, 'num_samples = None'),
    ('branch-twice', _with(branches=[GOOD['branches'][1], GOOD['branches'][1]]), 'branch 1 twice'),
    ('branch-not-int', _with(branch=dict(branch='1')), 'integer "branch"'),
    ('branch-negative', _with(branch=dict(branch=-1)), 'integer "branch"'),
    ('no-branches', dict(num_samples=3, rows=[]), '"branches" list'),
    ('not-an-object', '[1, 2, 3]', 'JSON object'),
    ('ensemble-out-of-range', _with(ensemble=dict(top1=101.0)), 'the ensemble has top1 = 101.0'),
    ('deep-json', '[' * 200_000 + ']' * 200_000, f'above the bound of {MAX_JSON_DEPTH}'),
    ('too-large', '{"pad": "' + 'x' * MAX_METRICS_BYTES + '"}', f'larger than {MAX_METRICS_BYTES:,} bytes'),
    ('not-utf8', b'\xff\xfe{}', 'not UTF-8'),
    ('not-json', '{not json', 'is not valid JSON'),
    ('huge-integer', '{"num_samples": ' + '9' * 5000 + '}', 'is not valid JSON'),
]


def _write(path, doc):
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding='utf-8')
    return path


def test_a_true_eval_result_passes_unchanged():
    checked = read_eval_metrics(GOOD)
    assert checked['num_samples'] == 12 and checked['split'] == 'test'
    assert checked['branches'][1] == dict(top1=41.67, top2=91.67, loss=0.7, params=108018)
    assert checked['ensemble'] == dict(top1=50.0, top2=100.0, loss=0.69)
    assert {b: (row['top1'], row['params']) for b, row in checked['branches'].items()} == {0: (50.0, 372594),
                                                                                         1: (41.67, 108018)}
    check_params(checked, 1, 108018)
    with pytest.raises(MetricsError, match='108,018 params, the model has 5'):
        check_params(checked, 1, 5)


@pytest.mark.parametrize('doc,fragment', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_out_of_range_or_malformed_is_refused_naming_the_value(tmp_path, doc, fragment):
    path = _write(tmp_path / 'eval.json', doc)
    with pytest.raises(MetricsError) as err:
        read_eval_metrics(path if not isinstance(doc, dict) else doc)
    assert fragment in str(err.value) and '\n' not in str(err.value)
    if isinstance(doc, dict):  # the same document from a file: the file is named
        with pytest.raises(MetricsError, match=str(path)):
            read_eval_metrics(path)


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / 'eval.json'
    os.mkfifo(fifo)
    with pytest.raises(MetricsError, match='not a regular file'):
        read_eval_metrics(fifo)  # opened without blocking: no writer is waited for


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    net = build_sila('test_resnet', 2)[0].eval()
    return net, strip(net, 1, tmp_path_factory.mktemp('card') / 'b1', img_size=32)


@pytest.mark.parametrize('case', ['top1-250', 'top5-minus-1e308', 'loss-infinite', 'params-float', 'deep-json'])
def test_card_and_bench_refuse_through_the_same_reader(folder, tmp_path, case):
    _, b1 = folder
    _, doc, fragment = next(c for c in CASES if c[0] == case)
    path = _write(tmp_path / 'eval.json', doc)
    with pytest.raises(MetricsError, match=re.escape(fragment)):
        model_card(b1, path)
    with pytest.raises(MetricsError, match=re.escape(fragment)):
        bench_branches(b1, metrics=path, batch_size=2, warmup=0, repeats=1)


def test_card_shows_the_checked_numbers(folder):
    _, b1 = folder
    params = count_params(load_stripped(b1))
    text = model_card(b1, _with(branch=dict(params=params)))
    assert '| 41.67 | 91.67 | 0.7000 |' in text and 'split `test` (12 images)' in text
    with pytest.raises(MetricsError, match='another model'):
        model_card(b1, GOOD)


@pytest.mark.parametrize('command', ['strip', 'bench'])
@pytest.mark.parametrize('case', ['top1-250', 'loss-infinite', 'params-float', 'num-samples-zero', 'deep-json'])
def test_cli_one_line_exit_2_nothing_written(folder, tmp_path, capfd, command, case):
    net, _ = folder
    _, doc, fragment = next(c for c in CASES if c[0] == case)
    metrics = _write(tmp_path / 'eval.json', doc)
    ckpt = tmp_path / 'ckpt.pth'
    torch.save(net.state_dict(), ckpt)
    before = sorted(os.listdir(tmp_path))
    argv = (['strip', str(ckpt), '--model', 'sila_test_resnet', '--branch', '1', '--out', str(tmp_path / 'out')]
            if command == 'strip' else ['bench', 'sila_test_resnet', '--num-classes', '2', '--img-size', '32'])
    assert main(argv + ['--metrics', str(metrics)]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'timm-sila {command}: error: '), captured.err
    assert fragment in lines[0] and str(metrics) in lines[0] and captured.out == ''
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no temp left behind


def test_numbers_just_inside_the_bounds_pass():
    edge = _with(branch=dict(top1=0.0, top2=100.0, loss=0.0, params=0))
    assert read_eval_metrics(edge)['branches'][1] == dict(top1=0.0, top2=100.0, loss=0.0, params=0)
    assert math.isfinite(read_eval_metrics(_with(branch=dict(loss=1e300)))['branches'][1]['loss'])
