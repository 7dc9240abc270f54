"""`timm-sila` console script: info (paper Table 3 columns) and strip; exit 2 with one line on bad input;
help and usage errors without importing torch."""
import argparse
import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import timm

from timm_sila import load_stripped
from timm_sila_cli import main


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A timm train.py-style checkpoint of a resnet18 SilaNet (no EMA), its model and an input."""
    torch.manual_seed(0)
    net = timm.create_model('sila_resnet18', num_classes=10).eval()
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth.tar'
    args = argparse.Namespace(model='sila_resnet18', num_classes=10, model_kwargs={}, img_size=32, input_size=None)
    torch.save(dict(epoch=0, arch='sila_resnet18', state_dict=net.state_dict(), args=args, version=2), path)
    return path, net, torch.randn(2, 3, 32, 32)


def test_info_json_matches_reference_counts(capsys):
    assert main(['info', 'sila_resnet18', '--num-classes', '10', '--img-size', '32', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    ref = timm.create_model('resnet18', num_classes=10)
    base = n_params(ref)
    head = lambda chs: chs * 10 * 3 * 3 + 10  # noqa: E731  3x3 conv head to N classes
    expected = [base,
                n_params(ref.conv1, ref.bn1, ref.layer1, ref.layer2, ref.layer3) + head(256),
                n_params(ref.conv1, ref.bn1, ref.layer1) + head(64)]
    assert info['taps'] == ['layer3', 'layer1'] and info['sets'] == 3
    assert [r['params'] for r in info['branches']] == expected
    for row, params in zip(info['branches'], expected):
        assert row['size_mb'] == pytest.approx(params * 4 / 2 ** 20)
        assert row['cr'] == pytest.approx(1 - params / base)
    assert info['train']['params'] == base + head(256) + head(64)


def test_info_table(capsys):
    assert main(['info', 'resnet18', '--num-classes', '10']) == 0
    out = capsys.readouterr().out
    assert 'sila_resnet18' in out and 'CR' in out and 'layer3' in out
    ref = timm.create_model('resnet18', num_classes=10)
    cr = 1 - (n_params(ref.conv1, ref.bn1, ref.layer1, ref.layer2, ref.layer3) + 256 * 90 + 10) / n_params(ref)
    assert f'{cr * 100:.2f}%' in out


def test_strip_command(checkpoint, tmp_path, capsys):
    path, net, x = checkpoint
    out = tmp_path / 'b1'
    assert main(['strip', str(path), '--branch', '1', '--out', str(out), '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['architecture'] == 'sila_resnet18' and result['branch'] == 1
    assert result['files']['model.safetensors'] == (out / 'model.safetensors').stat().st_size
    model = load_stripped(out)
    assert result['stored_values'] == n_params(model) + sum(b.numel() for b in model.buffers())
    net.branch = 1
    try:
        with torch.no_grad():
            assert torch.equal(model(x), net(x))
    finally:
        net.branch = 0
    # an existing folder needs --force: the CLI names its own flag, not the API's overwrite=True
    assert main(['strip', str(path), '--branch', '0', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'not empty' in err and '--force' in err and 'overwrite' not in err
    assert main(['strip', str(path), '--branch', '0', '--out', str(out), '--force']) == 0
    assert 'local-dir' in capsys.readouterr().out
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'resnet18'


@pytest.mark.parametrize('argv,message', [
    (['strip', '{missing}', '--branch', '0', '--out', '{out}'], 'does not exist'),
    (['strip', '{ckpt}', '--branch', '5', '--out', '{out}'], 'out of range'),
    (['strip', '{ckpt}', '--branch', '0', '--out', '{out}', '--ema'], 'no state_dict_ema'),
    (['strip', '{vanilla}', '--branch', '0', '--out', '{out}', '--model', 'sila_resnet18'], 'not a SilaNet'),
    (['strip', '{ckpt}', '--branch', '0', '--out', '{out}', '--model-kwargs', 'oops'], 'KEY=VALUE'),
    (['info', 'sila_no_such_net', '--num-classes', '10'], "unknown model 'sila_no_such_net'"),
    (['info', 'sila_resnet18'], 'needs --num-classes'),
])
def test_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, argv, message):
    vanilla = tmp_path / 'vanilla.pth'
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), vanilla)
    names = dict(missing=tmp_path / 'missing.pth.tar', out=tmp_path / 'out', ckpt=checkpoint[0], vanilla=vanilla)
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f'timm-sila {argv[0]}: error:')
    assert 'Traceback' not in captured.err and captured.out == ''
    assert not (tmp_path / 'out').exists()


def test_usage_errors_exit_2(capsys):
    assert main(['strip', 'x.pth.tar', '--out', 'y']) == 2  # no --branch
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize('text,expected', [
    # as timm's train.py reads --model-kwargs (utils.ParseKwargs): a Python literal, else the string itself
    ('sila_beta=0.25', 0.25), ('sila_sets=4', 4), ('sila_stripped=True', True), ('drop_rate=None', None),
    ("sila_taps=['layer3','layer1']", ['layer3', 'layer1']), ('sila_taps=[3,1]', [3, 1]), ('act_layer=gelu', 'gelu'),
    ('sila_head=conv3x3', 'conv3x3'), ('note=a=b', 'a=b'), ('x=1e-3', 1e-3), ('x=(1,2)', (1, 2)), ('x=', ''),
])
def test_model_kwargs_read_as_train_py_reads_them(text, expected):
    from timm.utils import ParseKwargs
    from timm_sila_cli import build_parser
    ours = build_parser().parse_args(['info', 'resnet18', '--model-kwargs', text]).model_kwargs
    reference = argparse.ArgumentParser()
    reference.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    assert ours == reference.parse_args(['--model-kwargs', text]).model_kwargs == {text.split('=')[0]: expected}


_HEAVY = ('torch', 'timm', 'timm_sila', 'numpy')


def test_help_and_usage_errors_import_no_torch():
    """`timm-sila --help` and every usage error answer from timm_sila_cli alone (no torch, timm or timm_sila)."""
    code = (
        'import json, sys\n'
        'import timm_sila_cli\n'
        'cases = json.loads(sys.argv[1])\n'
        'codes = [timm_sila_cli.main(argv) for argv in cases]\n'
        f'heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({list(_HEAVY)!r}))\n'
        'print(json.dumps(dict(codes=codes, heavy=heavy)), file=sys.stderr)\n')
    cases = [['--help'], ['strip', '--help'], ['eval', '--help'], ['exit-curve', '--help'], ['info', '--help'],
             [], ['nope'], ['strip', 'x.pth.tar', '--out', 'y'], ['strip', 'x', '--branch', '-1', '--out', 'y'],
             ['info', 'resnet18', '--model-kwargs', 'oops'], ['eval', '--model', 'm', '--data-dir', 'd',
                                                               '--batch-size', '0'],
             ['exit-curve', '--model', 'm', '--checkpoint', 'c', '--data-dir', 'd', '--calib-split', 'v',
              '--max-drop', 'nan'],
             ['exit-curve', '--model', 'm', '--checkpoint', 'c', '--data-dir', 'd', '--calib-split', 'v',
              '--calib-limit', '0']]
    run = subprocess.run([sys.executable, '-c', code, json.dumps(cases)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    report = json.loads(run.stderr.strip().splitlines()[-1])
    assert report['heavy'] == []
    assert report['codes'] == [0] * 5 + [2] * (len(cases) - 5)
    assert 'usage: timm-sila' in run.stdout and 'exit-curve' in run.stdout
    errors = run.stderr.strip().splitlines()[:-1]
    assert len(errors) == len(cases) - 5 and all(line.startswith('timm-sila') for line in errors)


def test_console_script_entry_point_is_torch_free():
    # the installed `timm-sila` must start in timm_sila_cli: any module under timm_sila imports torch first
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / 'setup.cfg')
    assert cfg['options.entry_points']['console_scripts'].strip() == 'timm-sila = timm_sila_cli:main'


def test_debug_shows_the_exception(tmp_path):
    for argv in (['strip', str(tmp_path / 'missing.pth'), '--branch', '0', '--out', str(tmp_path), '--debug'],
                 ['--debug', 'strip', str(tmp_path / 'missing.pth'), '--branch', '0', '--out', str(tmp_path)]):
        with pytest.raises(FileNotFoundError):
            main(argv)


@pytest.mark.slow
def test_console_script(tmp_path):
    script = Path(sys.executable).parent / 'timm-sila'
    assert script.exists(), 'console script missing: pip install -e .'
    run = subprocess.run([str(script), 'strip', str(tmp_path / 'missing.pth.tar'), '--branch', '0', '--out',
                          str(tmp_path / 'out')], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().count('\n') == 0 and 'does not exist' in run.stderr and 'Traceback' not in run.stderr
