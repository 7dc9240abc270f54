"""The memory a batch needs (timm_sila.measure.sizes): the input plus the model's largest activation, measured on
the meta device, checked before any command allocates it; a batch or image size that cannot fit is one line that
says what to pass, at once and without allocating it."""
import math
import os
from pathlib import Path

import pytest
import torch

import timm
from conftest import build_sila, image_folder, run_in_fresh_process, train_py_checkpoint
from timm_sila.data import memory
from timm_sila.data.folder import eval_loader
from timm_sila.data.memory import MemoryBoundError, available_memory, batch_memory, check_batch_fits

REPO = Path(__file__).resolve().parents[1]


def _largest_output_measured(model, input_size):
    """The largest module output of a real batch-1 forward pass (CPU), in bytes."""
    largest = []
    hooks = [m.register_forward_hook(lambda m, i, o: largest.append(o.numel() * o.element_size())
                                     if isinstance(o, torch.Tensor) else None) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.randn(1, *input_size))
    for h in hooks:
        h.remove()
    return max(largest)


@pytest.mark.parametrize('name,input_size', [('test_resnet', (3, 32, 32)), ('sila_test_resnet', (1, 40, 24)),
                                             ('test_vit', (3, 160, 160))])
def test_batch_memory_is_input_plus_the_largest_activation_measured_on_meta(name, input_size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=2, in_chans=input_size[0]).train()
    need = batch_memory(7, input_size, model)
    assert need['input'] == 7 * 4 * math.prod(input_size)
    assert need['activation'] == 7 * _largest_output_measured(model, input_size) > 0
    assert need['total'] == need['input'] + need['activation'] == 7 * need['per_sample']
    model.train()
    batch_memory(1, input_size, model)
    assert all(m.training for m in model.modules())  # modes left as they were
    assert all(p.device.type == 'cpu' for p in model.parameters())  # weights untouched
    assert batch_memory(7, input_size)['activation'] == 0  # no model: the input alone


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=2).eval()


# (id, batch size, input size, memory available, fragment of the error or None when it fits)
BOUNDS = [
    ('fits', 8, (3, 32, 32), 10 ** 9, None),
    ('fits-exactly', 10, (3, 32, 32), 10 * 45056, None),
    ('one-sample-over', 11, (3, 32, 32), 10 * 45056, 'a batch of 11 inputs of 3x32x32 needs at least 0.5 MiB'),
    ('batch-1e6', 1000000, (3, 32, 32), 20 * 10 ** 9,
     'a batch of 1,000,000 inputs of 3x32x32 needs at least 45.1 GB (12.3 GB for the input batch and 32.8 GB for the '
     "model's largest activation); 20.0 GB are available: pass a smaller batch_size (at most 443,892 could fit)."),
    ('img-60000', 1, (3, 60000, 60000), 20 * 10 ** 9, 'one input of 3x60000x60000 needs at least'),
    ('img-60000-batch', 256, (3, 60000, 60000), 20 * 10 ** 9, 'pass a smaller img_size.'),
]


@pytest.mark.parametrize('batch,input_size,available,error', [c[1:] for c in BOUNDS], ids=[c[0] for c in BOUNDS])
def test_check_batch_fits_refuses_what_cannot_fit_and_says_what_to_pass(small, batch, input_size, available, error):
    if error is None:
        assert check_batch_fits(batch, input_size, small, available=available)['total'] <= available
        return
    with pytest.raises(MemoryBoundError) as err:
        check_batch_fits(batch, input_size, small, available=available)
    e = err.value
    assert error in str(e) and isinstance(e, ValueError) and e.needed > e.available == available
    names = dict(batch_size='--batch-size', img_size='--img-size')
    api = next(a for a in names if f'pass a smaller {a}' in str(e))  # the API error names the argument to change
    assert f'pass a smaller {names[api]}' in e.message(**names) and api not in e.message(**names)  # the CLI its flag
    if e.largest_batch:  # the batch the error names as the largest passes, one more does not
        check_batch_fits(e.largest_batch, input_size, small, available=available)
        with pytest.raises(MemoryBoundError):
            check_batch_fits(e.largest_batch + 1, input_size, small, available=available)


def test_available_memory_is_read_from_the_system():
    available = available_memory()
    assert available is None or (isinstance(available, int) and 0 < available)
    if os.path.exists('/proc/meminfo'):
        assert available is not None
    assert available_memory('meta') is None


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A SilaNet checkpoint and an image folder (val, test): what the commands read."""
    root = tmp_path_factory.mktemp('bounds')
    net = build_sila('test_resnet', 2)[0]
    train_py_checkpoint(root / 'ckpt.pth.tar', net, 'sila_test_resnet', args_as_dict=True, img_size=32)
    image_folder(root / 'data', classes=('a', 'b'), n=1, splits=('val', 'test'))
    return root


HUGE = str(10 ** 8)  # 10^8 x 3x32x32 fp32 = 1.2 TB: more than any machine running the tests
CLI_BOUNDS = [  # (id, argv with {w} = the work folder, fragments of the one error line)
    ('bench-batch', ['bench', '{w}/ckpt.pth.tar', '--batch-size', HUGE],
     ['a batch of 100,000,000 inputs of 3x32x32', 'pass a smaller --batch-size']),
    ('export-batch', ['export', '{w}/ckpt.pth.tar', '--branch', '1', '--format', 'pt2', '--out', '{w}/b1.pt2',
                      '--batch-size', HUGE], ['a batch of 100,000,000 inputs of 3x32x32', 'pass a smaller --batch-size']),
    ('eval-batch-of-all-images', ['eval', '--model', 'sila_test_resnet', '--checkpoint', '{w}/ckpt.pth.tar',
                                  '--data-dir', '{w}/data', '--batch-size', HUGE, '--workers', '0'], None),
    ('eval-img-size', ['eval', '--model', 'sila_test_resnet', '--checkpoint', '{w}/ckpt.pth.tar', '--data-dir',
                       '{w}/data', '--img-size', '60000', '--workers', '0'],
     ['one input of 3x60000x60000 needs at least', 'pass a smaller --img-size']),
    ('exit-curve-img-size', ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', '{w}/ckpt.pth.tar',
                             '--data-dir', '{w}/data', '--calib-split', 'val', '--img-size', '60000',
                             '--save', '{w}/exit.safetensors'],
     ['one input of 3x60000x60000 needs at least', 'pass a smaller --img-size']),
]


@pytest.mark.slow
def test_cli_batch_and_image_size_bounds_are_one_line_exit_2_fast_and_small(work, tmp_path):
    cases = [dict(id=case[0], kind='cli', argv=[a.replace('{w}', str(work)) for a in case[1]]) for case in CLI_BOUNDS]
    before = sorted(str(p) for p in work.rglob('*'))
    runs = run_in_fresh_process(cases, work, tmp_path, timeout=300)
    # as one stream, in order; the peak RSS of the process after the last case
    result = dict(report=[dict(r, seconds=r['wall'], stderr=r['stdout'] + r['stderr']) for r in runs.values()],
                  maxrss_mb=max(r['rss_mb'] for r in runs.values()))
    assert result['maxrss_mb'] < 1024, result  # nothing near the sizes asked for was allocated
    for (name, _, fragments), got in zip(CLI_BOUNDS, result['report']):
        assert got['seconds'] < 5, (name, got['seconds'])
        if fragments is None:  # a batch size larger than the folder: the batch is the folder's 2 images
            assert got['rc'] == 0 and '2 images' in got['stderr'], (name, got)
            continue
        lines = got['stderr'].strip().splitlines()
        assert got['rc'] == 2 and len(lines) == 1, (name, got)
        assert lines[0].startswith('timm-sila ') and ': error: ' in lines[0] and 'available' in lines[0], (name, got)
        assert all(f in lines[0] for f in fragments), (name, lines[0])
    assert sorted(str(p) for p in work.rglob('*')) == before  # nothing written


def test_evaluating_on_another_device_counts_only_the_input_batch_against_ram(tmp_path, monkeypatch):
    """With the model on an accelerator, its activations are checked against that device's memory, not the host's:
    RAM that holds the input batch but not the activations refuses nothing."""
    model = build_sila('test_resnet')[0].eval()
    image_folder(tmp_path / 'data', classes=10, n=1)
    input_size = (3, 32, 32)
    need = batch_memory(4, input_size, model)
    assert need['activation'] > 0
    ram = need['input'] + need['activation'] // 2  # the batch fits, the batch and the activations do not
    monkeypatch.setattr(memory, 'available_memory', lambda device=None: ram if device is None else None)
    config = dict(input_size=input_size, interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    with pytest.raises(MemoryBoundError):
        eval_loader(tmp_path / 'data' / 'test', model, config, batch_size=4, device='cpu')
    eval_loader(tmp_path / 'data' / 'test', model, config, batch_size=4, device='meta')  # the device's own check
