"""evaluate() and `timm-sila eval`: every number checked against a reference computed directly."""
import json

import pytest
import torch
import torch.nn.functional as F

import timm
import timm_sila
from timm.data import create_transform, resolve_data_config
from timm_sila.measure.evaluate import evaluate
from timm_sila_cli.eval import format_eval
from timm_sila.measure.sizes import count_params
from timm_sila_cli import main

from conftest import build_sila, image_folder, train_py_args, train_py_checkpoint


def _data(n=45, num_classes=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _loader(x, y, batch_size=16):  # uneven last batch on purpose
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def _reference(logits, y, maxk=5):
    """top-k accuracy (%) by sorting, and mean CE."""
    order = logits.argsort(dim=1, descending=True)
    rank = (order == y[:, None]).float().argmax(1)  # position of the target in the ranking
    return [100.0 * (rank < k).double().mean().item() for k in range(1, maxk + 1)], F.cross_entropy(logits, y).item()


@pytest.fixture(scope='module')
def sila():
    model, _ = build_sila('resnet18')
    return model.eval()


def test_silanet_every_branch_and_ensemble_match_reference(sila):
    x, y = _data()
    with torch.no_grad():
        per_branch = [sila.forward_branch(x, k) for k in range(sila.sets)]
    # make branch 0 clearly better than chance so top-1 is not trivially ~10 %
    y = torch.where(torch.arange(len(y)) % 2 == 0, per_branch[0].argmax(1), y)
    result = evaluate(sila, _loader(x, y))
    assert result['num_samples'] == len(y) and result['topk'] == 5
    assert [b['branch'] for b in result['branches']] == [0, 1, 2]
    for k, logits in enumerate(per_branch):
        accs, loss = _reference(logits, y)
        row = result['branches'][k]
        assert [row[f'top{i}'] for i in range(1, 6)] == pytest.approx(accs, abs=1e-9)
        assert row['loss'] == pytest.approx(loss, rel=1e-5)
    assert result['branches'][0]['top1'] >= 50.0
    probs = torch.stack([lg.softmax(-1) for lg in per_branch]).mean(0)
    accs, _ = _reference(probs, y)
    ens = result['ensemble']
    assert [ens[f'top{i}'] for i in range(1, 6)] == pytest.approx(accs, abs=1e-9)
    assert ens['loss'] == pytest.approx(F.nll_loss(probs.log(), y).item(), rel=1e-5)
    assert not sila.training


def test_plain_timm_model_has_one_row_and_no_ensemble(sila):
    model = timm.create_model('resnet18', num_classes=10).eval()
    model.load_state_dict(sila.base.state_dict())
    x, y = _data(20)
    result = evaluate(model, _loader(x, y))
    assert len(result['branches']) == 1 and result['ensemble'] is None
    with torch.no_grad():
        accs, loss = _reference(model(x), y)
    assert result['branches'][0]['top1'] == pytest.approx(accs[0])
    assert result['branches'][0]['loss'] == pytest.approx(loss, rel=1e-5)
    assert result['branches'][0]['params'] == count_params(model) and result['branches'][0]['cr'] == 0.0
    full = evaluate(sila, _loader(x, y))  # same weights: same numbers as the SilaNet's branch 0
    assert full['branches'][0]['top1'] == result['branches'][0]['top1']


def test_stripped_branch_folder(sila, tmp_path):
    x, y = _data(30)
    folder = timm_sila.strip(sila, branch=1, out_dir=tmp_path / 'b1')
    stripped = timm_sila.load_stripped(folder)
    result = evaluate(stripped, _loader(x, y))
    full = evaluate(sila, _loader(x, y))
    (row,) = result['branches']
    assert row['branch'] == 1 and row['exit'] == sila.taps[0]
    assert row['top1'] == full['branches'][1]['top1'] and row['loss'] == pytest.approx(full['branches'][1]['loss'])
    assert row['params'] == full['branches'][1]['params']
    assert row['cr'] == pytest.approx(full['branches'][1]['cr'])


def test_topk_capped_by_classes_and_empty_loader():
    model = build_sila('resnet18', 3)[0].eval()
    x, y = _data(10, num_classes=3)
    result = evaluate(model, _loader(x, y))
    assert result['topk'] == 3
    assert all(b['top3'] == 100.0 for b in result['branches'])
    assert 'top3' in format_eval(result) and 'top4' not in format_eval(result)
    with pytest.raises(ValueError, match='empty loader'):
        evaluate(model, [])


# --- CLI ---------------------------------------------------------------------------------------------------------
def _cli(argv):
    """`timm-sila ARGV --debug`: the exit status, or the exception a bad input raises."""
    return main(argv + ['--debug'])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A sila_resnet18 (3 classes) saved as train_cifar.py / timm train.py save it, and its image folder."""
    root = tmp_path_factory.mktemp('evalcli')
    image_folder(root, classes=3, n=4)
    torch.manual_seed(1)
    net = timm.create_model('sila_resnet18', num_classes=3).eval()
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    train_py_checkpoint(root / 'ckpt.pth.tar', net, 'sila_resnet18', args_as_dict=True,
                        model_kwargs=dict(net.sila_args()), img_size=32, input_size=[3, 32, 32], mean=mean, std=std,
                        crop_pct=1.0, interpolation='bilinear')
    return root, net, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _reference_images(root, mean, std):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor
    ds = ImageFolder(str(root / 'test'))
    x = torch.stack([pil_to_tensor(ds.loader(p)) for p, _ in ds.samples]).float() / 255
    return (x - mean) / std, torch.tensor(ds.targets)


def test_cli_eval_checkpoint_json_matches_api(trained, capsys):
    root, net, mean, std = trained
    rc = _cli(['eval', '--model', 'sila_resnet18', '--checkpoint', str(root / 'ckpt.pth.tar'), '--data-dir',
               str(root), '--split', 'test', '--batch-size', '5', '--workers', '0', '--json'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    x, y = _reference_images(root, mean, std)
    ref = evaluate(net, _loader(x, y))
    assert out['num_samples'] == 12 and out['data_config']['input_size'] == [3, 32, 32]
    for got, want in zip(out['branches'] + [out['ensemble']], ref['branches'] + [ref['ensemble']]):
        assert got['top1'] == want['top1'] and got['top3'] == want['top3']
        assert got['loss'] == pytest.approx(want['loss'], rel=1e-4)
    assert [b['cr'] for b in out['branches']] == pytest.approx([b['cr'] for b in ref['branches']])


def test_cli_eval_stripped_folder_and_table(trained, tmp_path, capsys):
    root, net, mean, std = trained
    folder = timm_sila.strip(root / 'ckpt.pth.tar', branch=0, out_dir=tmp_path / 'b0')
    rc = _cli(['eval', '--model', f'local-dir:{folder}', '--data-dir', str(root), '--workers', '0',
               '--no-progress'])
    assert rc == 0
    text = capsys.readouterr().out
    x, y = _reference_images(root, mean, std)
    ref = evaluate(net, _loader(x, y))
    line = next(ln for ln in text.splitlines() if ln.startswith('0 '))
    assert f"{ref['branches'][0]['top1']:.2f}" in line and 'classifier' in line
    assert 'ens' not in text.split('---')[-1].splitlines()[1:][0]  # one branch: no ensemble row


def test_cli_eval_bad_input(trained, tmp_path):
    root, _, _, _ = trained
    with pytest.raises(FileNotFoundError, match='split'):
        _cli(['eval', '--model', 'sila_resnet18', '--checkpoint', str(root / 'ckpt.pth.tar'),
              '--data-dir', str(root), '--split', 'val'])
    with pytest.raises(ValueError, match='needs --checkpoint'):
        _cli(['eval', '--model', 'sila_resnet18', '--data-dir', str(root)])
    with pytest.raises(ValueError, match='EMA'):
        _cli(['eval', '--model', 'sila_resnet18', '--checkpoint', str(root / 'ckpt.pth.tar'), '--data-dir',
              str(root), '--ema'])
    with pytest.raises(FileNotFoundError, match='config.json'):
        _cli(['eval', '--model', f'local-dir:{tmp_path}', '--data-dir', str(root)])


# --- checkpoints written by timm's train.py: every argument stored, data ones at "use the model's default" --------
@pytest.fixture(scope='module')
def trainpy_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('trainpy')
    image_folder(root, classes=3, n=3, splits=('validation', 'test'))
    return root


def _trainpy_checkpoint(path, net, **overrides):
    """A checkpoint as timm's train.py saves it: `args` is the argparse.Namespace of all its arguments."""
    train_py_checkpoint(path, net, 'sila_resnet18', device_modules=['timm_sila'], **overrides)
    return train_py_args(model='sila_resnet18', num_classes=3, device_modules=['timm_sila'], **overrides)


@pytest.mark.parametrize('overrides', [{}, {'img_size': 32}, {'img_size': 40, 'crop_pct': 0.8,
                                                                  'interpolation': 'bilinear'}])
def test_cli_eval_trainpy_checkpoint_uses_trainpy_data_config(trainpy_folder, tmp_path, capsys, overrides):
    """train.py stores interpolation='' and None for mean/std/crop_pct/input_size (= the model's default): eval
    resolves them as train.py's own validation does, timm.data.resolve_data_config(vars(args), model=model)."""
    torch.manual_seed(2)
    net = timm.create_model('sila_resnet18', num_classes=3).eval()
    args = _trainpy_checkpoint(tmp_path / 'last.pth.tar', net, **overrides)
    rc = _cli(['eval', '--model', 'sila_resnet18', '--checkpoint', str(tmp_path / 'last.pth.tar'), '--data-dir',
               str(trainpy_folder), '--workers', '0', '--device', 'cpu', '--json'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cfg = resolve_data_config(vars(args), model=net)  # what train.py validates with
    assert out['data_config'] == {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    assert out['data_config']['interpolation'] == overrides.get('interpolation', net.pretrained_cfg['interpolation'])
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(str(trainpy_folder / 'test'), transform=create_transform(**cfg))
    x = torch.stack([img for img, _ in dataset])
    ref = evaluate(net, _loader(x, torch.tensor(dataset.targets)))
    for got, want in zip(out['branches'], ref['branches']):
        assert got['top1'] == want['top1'] and got['loss'] == pytest.approx(want['loss'], rel=1e-4)


def test_cli_exit_curve_trainpy_checkpoint(trainpy_folder, tmp_path, capsys):
    torch.manual_seed(3)
    net = timm.create_model('sila_resnet18', num_classes=3).eval()
    _trainpy_checkpoint(tmp_path / 'last.pth.tar', net, img_size=32)
    rc = _cli(['exit-curve', '--model', 'sila_resnet18', '--checkpoint', str(tmp_path / 'last.pth.tar'),
               '--data-dir', str(trainpy_folder), '--calib-split', 'validation', '--batch-size', '3', '--points', '3',
               '--json'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out['eval_samples'] == 9 and out['calib_samples'] == 9
