"""Opt-in: a real timm train.py (TIMM_TRAIN_PY=/path/to/train.py) trains a SilaNet for a few batches; the README's
next steps then run on the checkpoint it wrote: strip, `timm-sila eval`, `timm-sila exit-curve`.

train.py is not part of the timm wheel; point TIMM_TRAIN_PY at one from a clone of the timm repository (its folder
must not contain a `timm/` package that shadows the installed one, or run it from a clone of the installed version).
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm
from timm.data import create_transform, resolve_data_config

TRAIN_PY = os.environ.get('TIMM_TRAIN_PY')
pytestmark = pytest.mark.skipif(not TRAIN_PY, reason='set TIMM_TRAIN_PY to the path of a timm train.py')

N, BETA, DECAY, SETS, BRANCH = 2, 1.0, 0.5, 3, 1  # large β so the Sila loss is far from plain CE at init
TRAIN_LINE = re.compile(r'Train: (\d+) \[\s*(\d+)/(\d+) .*?Loss: (\S+) \((\S+)\)')
TIMEOUT_S = 600
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp('images')
    g = torch.Generator().manual_seed(0)
    for split, count in (('train', 8), ('validation', 4)):
        for c in range(N):
            (root / split / f'class{c}').mkdir(parents=True)
            for i in range(count):
                img = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8)
                img[..., c] //= 4  # a learnable colour cue
                Image.fromarray(img.numpy()).save(root / split / f'class{c}' / f'{i}.png')
    return root


def _train(image_folder, out_dir, *extra):
    cmd = [
        sys.executable, TRAIN_PY, '--device-modules', 'timm_sila', '--model', 'sila_resnet18',
        '--model-kwargs', f'sila_beta={BETA}', f'sila_decay={DECAY}', f'sila_branch={BRANCH}',
        '--data-dir', str(image_folder), '--num-classes', str(N), '--img-size', '32', '--device', 'cpu',
        '--workers', '0', '-b', '4', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.01',
        '--output', str(out_dir), '--experiment', 'run', '--log-interval', '1', '--seed', '0', *extra]
    proc = subprocess.run(cmd, cwd=Path(TRAIN_PY).parent, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    return proc, out_dir / 'run'


def _eval_top1_and_loss(model, image_folder):
    """Top-1 (%) and mean CE of `model` (eval mode) on the validation split, with train.py's eval transform."""
    transform = create_transform(**resolve_data_config({'img_size': 32}, model=model))
    correct, losses, total = 0, [], 0
    with torch.no_grad():
        for c in range(N):
            for path in sorted((image_folder / 'validation' / f'class{c}').glob('*.png')):
                from PIL import Image
                out = model(transform(Image.open(path).convert('RGB'))[None])
                correct += int(out.argmax(1).item() == c)
                losses.append(torch.nn.functional.cross_entropy(out, torch.tensor([c])).item())
                total += 1
    return 100.0 * correct / total, sum(losses) / total


def test_train_py_trains_the_sila_loss_and_checkpoints_strip(image_folder, tmp_path):
    proc, run_dir = _train(image_folder, tmp_path / 'out', '--model-ema', '--model-ema-decay', '0.5')
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [m.groups() for m in TRAIN_LINE.finditer(proc.stderr)]
    assert steps, proc.stderr[-2000:]
    assert 'criterion=LabelSmoothingCrossEntropy' in proc.stderr  # train.py default --smoothing 0.1
    # step 0, near-uniform logits at init: Sila loss ≈ (1 + β + βλ)·log(M·N) (any targets, any smoothing);
    # a plain cross-entropy over the M·N logits would be ≈ log(M·N).
    step0 = float(steps[0][3])
    sila, plain = (1 + BETA + BETA * DECAY) * math.log(SETS * N), math.log(SETS * N)
    assert abs(step0 - sila) < 0.25 * (sila - plain), (step0, sila, plain)

    ckpt_path = run_dir / 'last.pth.tar'
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'sila_resnet18'
    for key in ('state_dict', 'state_dict_ema'):
        sd = ckpt[key]
        assert any(k.startswith('base.') for k in sd) and any(k.startswith('heads.') for k in sd), key
        assert not any(k.startswith(('module.', '_orig_mod.')) for k in sd), key

    # train.py validated (the EMA copy of) the SilaNet in eval mode, i.e. branch `sila_branch`
    model = timm.create_model('sila_resnet18', num_classes=N, sila_beta=BETA, sila_decay=DECAY, sila_branch=BRANCH)
    model.load_state_dict(ckpt['state_dict_ema'])
    model.eval()
    top1, loss = _eval_top1_and_loss(model, image_folder)
    with open(run_dir / 'summary.csv') as f:
        summary = list(csv.DictReader(f))[-1]
    assert float(summary['eval_top1']) == pytest.approx(top1)
    assert float(summary['eval_loss']) == pytest.approx(loss, rel=1e-3, abs=1e-3)

    if importlib.util.find_spec('timm_sila.ship.strip') is not None:
        from timm_sila.ship.strip import load_stripped, strip
        x = torch.randn(2, 3, 32, 32)
        for branch in (0, BRANCH):
            out_dir = strip(ckpt_path, branch=branch, out_dir=tmp_path / f'branch{branch}', ema=True)
            shipped = load_stripped(out_dir).eval()
            with torch.no_grad():
                torch.testing.assert_close(shipped(x), model.forward_branch(x, branch))

    # timm-sila eval / exit-curve on the checkpoint as train.py wrote it: its args hold train.py's data defaults
    # (interpolation='', mean=None, ...), which mean "the model's default", exactly as in train.py's validation
    evaluated = _timm_sila('eval', '--model', 'sila_resnet18', '--checkpoint', ckpt_path, '--ema', '--data-dir',
                           image_folder, '--split', 'validation', '--workers', '0', '--device', 'cpu')
    assert evaluated['num_samples'] == 4 * N and evaluated['data_config']['input_size'] == [3, 32, 32]
    assert evaluated['branches'][BRANCH]['top1'] == pytest.approx(float(summary['eval_top1']))
    assert evaluated['branches'][BRANCH]['loss'] == pytest.approx(float(summary['eval_loss']), rel=1e-3, abs=1e-3)
    curve = _timm_sila('exit-curve', '--model', 'sila_resnet18', '--checkpoint', ckpt_path, '--data-dir',
                       image_folder, '--split', 'validation', '--calib-split', 'train', '--batch-size', '4',
                       '--points', '3')
    assert curve['eval_samples'] == 4 * N and curve['calib_samples'] == 8 * N and curve['rows']


def _timm_sila(*argv):
    """Run the timm-sila command line in a fresh process; its --json result."""
    proc = subprocess.run([sys.executable, '-m', 'timm_sila_cli', *map(str, argv), '--json'], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_train_py_bce_loss_stops_with_the_flag_name(image_folder, tmp_path):
    proc, run_dir = _train(image_folder, tmp_path / 'out', '--bce-loss')
    assert proc.returncode != 0
    assert 'SilaLossError' in proc.stderr and '--bce-loss' in proc.stderr, proc.stderr[-3000:]
    assert not TRAIN_LINE.search(proc.stderr)  # no step was taken
