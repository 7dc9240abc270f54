"""bench_branches(): per-branch speed measured side by side, with params / MB / CR and accuracy from an eval JSON."""
import json
import time

import pytest
import torch

import timm

from conftest import build_sila, train_py_checkpoint
from timm_sila import strip
from timm_sila.measure.bench import _time_side_by_side, bench_branches
from timm_sila_cli.bench import format_bench
from timm_sila.measure.sizes import model_info

FAST = dict(img_size=32, batch_size=2, threads=1, warmup=1, repeats=5)


@pytest.fixture(scope='module')
def net():
    return build_sila('resnet18')[0].eval()


def test_rounds_alternate_and_warm_up_untimed():
    calls = []

    def runner(i):
        def run(x):
            calls.append(i)
            time.sleep(0.01 * i)  # sleeps at least this long: each time must land with its own model
        return run
    times = _time_side_by_side([runner(i) for i in range(3)], None, warmup=2, repeats=4)
    assert calls[:6] == [0, 1, 2, 0, 1, 2]  # warm-up: every model, untimed
    assert calls[6:] == [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]  # round i starts at model i mod 3
    assert [len(t) for t in times] == [4, 4, 4]
    assert all(s >= 0.01 * i for i, t in enumerate(times) for s in t)


def test_every_branch_of_a_silanet(net, tmp_path):
    info = model_info('sila_resnet18', num_classes=10, img_size=32)
    metrics = dict(num_samples=100, branches=[dict(branch=k, top1=50.0 - 5 * k, top5=90.0, params=r['params'])
                                              for k, r in enumerate(info['branches'])])
    (tmp_path / 'eval.json').write_text(json.dumps(metrics))
    result = bench_branches(net, metrics=tmp_path / 'eval.json', **FAST)
    rows = result['rows']
    assert [r['branch'] for r in rows] == [0, 1, 2] and [r['exit'] for r in rows] == ['classifier'] + net.taps
    assert [r['params'] for r in rows] == [r['params'] for r in info['branches']]  # Table 3's counts
    assert [round(r['cr'], 6) for r in rows] == [round(r['cr'], 6) for r in info['branches']]
    assert [r['top1'] for r in rows] == [50.0, 45.0, 40.0]
    for r in rows:
        assert r['images_per_s'] == pytest.approx(2 / (r['latency_ms'] / 1000))
    assert rows[0]['speedup'] == 1.0
    # branch 2 runs the stem and layer1 only: faster than the whole resnet18 even on a busy machine
    assert rows[2]['images_per_s'] > rows[0]['images_per_s']
    table = format_bench(result)
    assert 'median of 5 rounds after 1 warm-up' in table and 'layer3' in table and '98.54%' in table


def test_stripped_folder_times_its_base_too(net, tmp_path):
    folder = strip(net, branch=2, out_dir=tmp_path / 'b2', img_size=32)
    result = bench_branches(folder, **dict(FAST, img_size=None))  # input size from the folder's config.json
    assert result['input_size'] == [3, 32, 32]
    base, b2 = result['rows']
    assert (base['branch'], base['weights'], b2['branch'], b2['exit']) == (0, 'random', 2, 'layer1')
    assert base['params'] == 11181642 and b2['params'] == 163274
    assert '* random weights' in format_bench(result)


def test_model_name_random_weights_and_bad_input(net):
    threads = torch.get_num_threads()
    result = bench_branches('sila_resnet18', num_classes=10, sets=2, **dict(FAST, threads=2))
    assert [r['branch'] for r in result['rows']] == [0, 1] and result['threads'] == 2
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match='runtime must be one of'):
        bench_branches(net, runtime='tensorrt')
    with pytest.raises(ValueError, match='repeats must be an integer >= 1'):
        bench_branches(net, repeats=0)
    with pytest.raises(ValueError, match='another model'):
        bench_branches(net, metrics=dict(num_samples=1, branches=[dict(branch=1, top1=1.0, params=5)]), **FAST)
    with pytest.raises(ValueError, match='"branches" list'):
        bench_branches(net, metrics=dict(rows=[]), **FAST)


@pytest.mark.slow
def test_onnxruntime_runtime(tmp_path):
    pytest.importorskip('onnxruntime', reason='needs pip install "timm-sila[export]"')
    torch.manual_seed(0)
    small = timm.create_model('sila_test_resnet', num_classes=10, sila_sets=2).eval()
    result = bench_branches(small, runtime='onnxruntime', **FAST)
    assert result['runtime'] == 'onnxruntime' and [r['branch'] for r in result['rows']] == [0, 1]
    assert all(r['images_per_s'] > 0 for r in result['rows'])


def test_onnxruntime_runs_at_a_checkpoints_non_square_input_size(tmp_path):
    """The ONNX models are exported at the (H, W) the torch rows run at, not at a square of the width."""
    pytest.importorskip('onnxruntime', reason='needs pip install "timm-sila[export]"')
    torch.manual_seed(0)
    small = timm.create_model('sila_test_resnet', num_classes=10, sila_sets=2).eval()
    ckpt = train_py_checkpoint(tmp_path / 'ckpt.pth.tar', small, 'sila_test_resnet', input_size=[3, 32, 48])
    fast = {k: v for k, v in FAST.items() if k != 'img_size'}
    result = bench_branches(ckpt, runtime='onnxruntime', **fast)
    assert list(result['input_size']) == [3, 32, 48] and [r['branch'] for r in result['rows']] == [0, 1]
