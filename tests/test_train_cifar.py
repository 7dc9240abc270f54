"""examples/train_cifar.py: augmentation, schedule, identical recipe for base and Sila, logs, checkpoint, strip."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import timm
import timm_sila
from timm_sila.io.checkpoint import load_silanet, read_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'examples'))
import train_cifar  # noqa: E402


def _tiny_data(n_train=96, n_test=40, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                      torch.arange(n) % classes)
    return {'train': make(n_train), 'test': make(n_test), 'classes': [f'c{i}' for i in range(classes)]}


def test_augment_is_seeded_pad_crop_flip():
    x = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = train_cifar.augment(x, torch.Generator().manual_seed(7), padding=2)
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order
    dy, dx = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)
    assert out.dtype == torch.uint8
    torch.testing.assert_close(out, train_cifar.augment(x, torch.Generator().manual_seed(7), padding=2))


def test_schedule_paper_and_scaled():
    assert train_cifar.milestones_for('paper', 260) == [30, 55, 80, 105, 135, 160, 180, 200, 220, 240]
    scaled = train_cifar.milestones_for('scaled', 26)
    assert scaled == pytest.approx([3.0, 5.5, 8.0, 10.5, 13.5, 16.0, 18.0, 20.0, 22.0, 24.0])
    assert train_cifar.lr_at(0.0, 0.1, scaled, 0.5) == 0.1
    assert train_cifar.lr_at(5.4, 0.1, scaled, 0.5) == pytest.approx(0.05)
    assert train_cifar.lr_at(5.5, 0.1, scaled, 0.5) == pytest.approx(0.025)
    assert train_cifar.lr_at(25.9, 0.1, scaled, 0.5) == pytest.approx(0.1 * 0.5 ** 10)


def test_base_and_sila_share_init_batches_and_augmentation():
    args = train_cifar.parse_args(['--also-base', '--epochs', '1', '--batch-size', '32', '--no-progress'])
    args.beta, args.decay = 0.1, 0.5
    runs = train_cifar.build_runs(args, num_classes=3)
    sila, base = runs[0].model, runs[1].model
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, sila.base.state_dict()[k], rtol=0, atol=0)
    assert isinstance(runs[0].criterion, timm_sila.SilaLoss)
    assert isinstance(runs[1].criterion, torch.nn.CrossEntropyLoss)
    x, y = _tiny_data(64)['train']
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    milestones = train_cifar.milestones_for('scaled', 1)
    losses = [train_cifar.train_one_epoch(run, x, y, mean, std, 0, args, milestones) for run in runs]
    # the same number of draws in the same order: both generators end in the same state
    assert torch.equal(runs[0].gen.get_state(), runs[1].gen.get_state())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_end_to_end_one_epoch(tmp_path):
    out = tmp_path / 'run'
    data = _tiny_data()
    final = train_cifar.main(['--also-base', '--epochs', '1', '--batch-size', '32', '--val-fraction', '0.25',
                              '--out', str(out), '--no-progress', '--seed', '3'], data=data)
    # logs: one row per run and epoch, ACC per output set (paper Table 1), validation split carved from train
    with open(out / 'log.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['run'] for r in rows] == ['sila', 'base']
    assert {'ACC1', 'ACC2', 'ACC3', 'ENS', 'VAL1', 'train_loss', 'epoch_time_s', 'elapsed_s'} <= set(rows[0])
    assert rows[1]['ACC2'] == '' and rows[1]['ACC1'] != ''
    log = json.loads((out / 'log.json').read_text())
    assert log['seed'] == 3 and len(log['epochs']) == 2 and log['taps'] == ['layer3', 'layer1']
    assert final['runs']['sila']['num_samples'] == 40

    # checkpoint: what `timm-sila strip` reads
    ckpt = read_checkpoint(out / 'sila_checkpoint.pth.tar')
    assert ckpt.model_name == 'sila_resnet18' and ckpt.model_kwargs['num_classes'] == 3
    assert ckpt.model_kwargs['sila_taps'] == ['layer3', 'layer1'] and ckpt.model_kwargs['sila_beta'] == 0.1
    assert tuple(ckpt.data_config['input_size']) == (3, 32, 32) and len(ckpt.data_config['mean']) == 3
    net = load_silanet(ckpt)
    raw = torch.load(out / 'sila_checkpoint.pth.tar', weights_only=True)
    assert raw['arch'] == 'sila_resnet18' and raw['epoch'] == 1
    base_raw = torch.load(out / 'base_checkpoint.pth.tar', weights_only=True)
    assert base_raw['arch'] == 'resnet18' and not any(k.startswith('heads.') for k in base_raw['state_dict'])

    # stripped folders: branch 0 is a plain resnet18 for timm, branch 1 the compressed prefix + head 1
    x = train_cifar.normalize(data['test'][0][:8], torch.tensor(ckpt.data_config['mean']).view(1, 3, 1, 1),
                              torch.tensor(ckpt.data_config['std']).view(1, 3, 1, 1))
    config = json.loads((out / 'branch0' / 'config.json').read_text())
    assert config['architecture'] == 'resnet18'
    plain = timm.create_model(f'local-dir:{out / "branch0"}', pretrained=True).eval()
    branch1 = timm_sila.load_stripped(out / 'branch1')
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net.forward_branch(x, 0))
        torch.testing.assert_close(branch1(x), net.forward_branch(x, 1))
    assert len(branch1.base.layer4) == 0 and len(branch1.heads) == 1  # nothing after tap 1 (layer3)


@pytest.mark.slow
def test_demo_writes_under_ignored_output_and_refuses_a_foreign_folder(tmp_path):
    """`make demo` writes to output/demo (ignored by git, replaced by the next run), not a new temp folder per run;
    a non-empty --out that no demo wrote is refused before anything is written."""
    import subprocess
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'examples'))
    import demo
    repo = Path(__file__).resolve().parents[1]
    assert demo.DEFAULT_OUT == repo / 'output' / 'demo'
    ignored = subprocess.run(['git', 'check-ignore', '-q', 'output/demo/sila_checkpoint.pth.tar'], cwd=repo)
    assert ignored.returncode == 0
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('not a demo output')
    run = subprocess.run([sys.executable, str(repo / 'examples' / 'demo.py'), '--out', str(mine)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and 'holds no demo output' in run.stderr
    assert [p.name for p in mine.iterdir()] == ['notes.txt']


def test_resumed_run_continues_bit_for_bit(tmp_path):
    """--state: 1 epoch, then the same run extended to 2 (paper schedule) == 2 epochs in one go; a state of other
    settings is refused."""
    common = ['--model', 'sila_test_resnet', '--also-base', '--recipe', 'paper', '--batch-size', '32', '--lr', '0.05',
              '--no-strip', '--no-progress', '--threads', '1']
    data = _tiny_data()
    straight = train_cifar.main(common + ['--epochs', '2', '--out', str(tmp_path / 'a')], data=data)
    state = tmp_path / 'state.pt'
    train_cifar.main(common + ['--epochs', '1', '--out', str(tmp_path / 'b'), '--state', str(state)], data=data)
    assert torch.load(state, weights_only=True)['epoch'] == 1
    resumed = train_cifar.main(common + ['--epochs', '2', '--out', str(tmp_path / 'b'), '--state', str(state)],
                               data=data)
    for run in ('sila', 'base'):
        a, b = straight['runs'][run], resumed['runs'][run]
        assert [br['top1'] for br in a['branches']] == [br['top1'] for br in b['branches']]
        assert a['branches'][0]['loss'] == b['branches'][0]['loss']
        ckpt_a = torch.load(tmp_path / 'a' / f'{run}_checkpoint.pth.tar', weights_only=True)['state_dict']
        ckpt_b = torch.load(tmp_path / 'b' / f'{run}_checkpoint.pth.tar', weights_only=True)['state_dict']
        assert ckpt_a.keys() == ckpt_b.keys() and all(torch.equal(ckpt_a[k], ckpt_b[k]) for k in ckpt_a)
    log = json.loads((tmp_path / 'b' / 'log.json').read_text())
    assert [r['epoch'] for r in log['epochs'] if r['run'] == 'sila'] == [1, 2]
    with pytest.raises(SystemExit, match='other settings'):
        train_cifar.main(common + ['--epochs', '2', '--lr', '0.01', '--out', str(tmp_path / 'c'), '--state',
                                   str(state)], data=data)
