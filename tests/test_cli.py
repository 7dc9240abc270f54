"""The `timm-sila` console script: info (paper Table 3 columns) and strip; help and usage errors without importing
torch; and the promise every command keeps for expected failures: exit status 2, exactly one line on stderr naming
what is wrong, nothing on stdout and nothing written. Table-driven over hostile and clumsy inputs, plus a full disk
(a file size limit everywhere; a small tmpfs where the machine allows mounting), permission denied, and `--json`
runs whose stdout is the JSON document alone."""
import argparse
import configparser
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import timm

from conftest import build_sila, image_folder, snapshot, train_py_checkpoint
from timm_sila import load_stripped
from timm_sila_cli import main

REPO = Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b'caf\xe9')  # latin-1 bytes: not valid UTF-8 (a surrogate escape in Python's str)


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A timm train.py-style checkpoint of a resnet18 SilaNet (no EMA), its model and an input."""
    net = build_sila('resnet18')[0].eval()
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth.tar'
    train_py_checkpoint(path, net, 'sila_resnet18', img_size=32)
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


# --- bad input: one line, exit status 2, nothing written ---------------------------------------------------------
@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A folder (readable by everyone, for the permission checks) with a train.py-style checkpoint, an image
    folder, a non-empty export folder and stripped folders with broken config.json files."""
    root = Path(tempfile.mkdtemp(prefix='timm-sila-cli-'))
    os.chmod(root, 0o755)
    net = build_sila('resnet18', 2)[0]
    train_py_checkpoint(root / 'ckpt.pth.tar', net, 'sila_resnet18', args_as_dict=True, img_size=32)
    os.chmod(root / 'ckpt.pth.tar', 0o644)
    image_folder(root / 'data', splits=('test', 'val'))
    (root / 'data' / 'empty' / 'c0').mkdir(parents=True)
    (root / 'data' / 'empty' / 'c1').mkdir()
    (root / 'existing').mkdir()
    (root / 'existing' / 'mine.txt').write_text('a user file')
    for name, text in (('bad_json', '{"architecture": "resnet18", '), ('list_json', '[1, 2]'),
                       ('binary_json', b'\xff\xfe{}')):
        (root / name).mkdir()
        (root / name / 'config.json').write_bytes(text if isinstance(text, bytes) else text.encode())
        (root / name / 'model.safetensors').write_bytes(b'')
    for p in root.rglob('*'):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _expect_one_line(capfd, *fragments):
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith('timm-sila'), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert 'Traceback' not in captured.err and captured.out == ''
    return lines[0]


EVAL = ['eval', '--model', 'sila_resnet18', '--checkpoint', '{w}/ckpt.pth.tar', '--data-dir', '{w}/data',
        '--workers', '0']
CURVE = ['exit-curve', '--model', 'sila_resnet18', '--checkpoint', '{w}/ckpt.pth.tar', '--data-dir', '{w}/data',
         '--calib-split', 'val']
STRIP = ['strip', '{w}/ckpt.pth.tar', '--branch', '0', '--out', '{w}/out']

# (id, argv with {w} = the work folder, fragments the one error line must contain)
CASES = [
    # paths that are not valid UTF-8: refused before anything is read or written
    ('out-not-utf8', ['strip', '{w}/ckpt.pth.tar', '--branch', '0', '--out', '{w}/' + NOT_UTF8],
     ['--out', 'not valid UTF-8', "caf\\xe9'"]),
    ('checkpoint-not-utf8', ['strip', '{w}/' + NOT_UTF8, '--branch', '0', '--out', '{w}/out'], ['not valid UTF-8']),
    ('data-dir-not-utf8', ['eval', '--model', 'sila_resnet18', '--checkpoint', '{w}/ckpt.pth.tar', '--data-dir',
                           '{w}/' + NOT_UTF8], ['--data-dir', 'not valid UTF-8']),
    ('png-not-utf8', CURVE + ['--png', '{w}/' + NOT_UTF8 + '.png'], ['--png', 'not valid UTF-8']),
    ('empty-out', ['strip', '{w}/ckpt.pth.tar', '--branch', '0', '--out', ''], ['--out', 'empty path']),
    # malformed config.json of a stripped folder: the file is named
    ('config-not-json', ['eval', '--model', 'local-dir:{w}/bad_json', '--data-dir', '{w}/data'],
     ['{w}/bad_json/config.json']),
    ('config-not-utf8', ['eval', '--model', 'local-dir:{w}/binary_json', '--data-dir', '{w}/data'],
     ['{w}/binary_json/config.json']),
    ('config-not-a-mapping', ['eval', '--model', 'local-dir:{w}/list_json', '--data-dir', '{w}/data'],
     ['{w}/list_json/config.json']),
    # --device
    ('unknown-device', EVAL + ['--device', 'gpu'], ["--device 'gpu'"]),
    ('absent-device', EVAL + ['--device', 'cuda:99'], ["--device 'cuda:99'"]),
    ('meta-device', EVAL + ['--device', 'meta'], ["--device 'meta'"]),
    # --model-kwargs: parsed as timm's train.py parses them; keys the model does not take are named
    ('kwargs-no-equals', STRIP + ['--model-kwargs', 'oops'], ['--model-kwargs', "'oops'", 'KEY=VALUE']),
    ('kwargs-empty-key', STRIP + ['--model-kwargs', '=3'], ['--model-kwargs', "'=3'"]),
    ('kwargs-key-not-a-name', ['info', 'resnet18', '--num-classes', '2', '--model-kwargs', 'a-b=1'],
     ['--model-kwargs', "'a-b=1'"]),
    ('kwargs-unknown-info', ['info', 'resnet18', '--num-classes', '2', '--model-kwargs', 'no_such_arg=1'],
     ['no_such_arg']),
    ('kwargs-unknown-strip', STRIP + ['--model-kwargs', 'no_such_arg=1'], ['no_such_arg']),
    # unknown model names, reported as typed
    ('unknown-model-info', ['info', 'resnet19', '--num-classes', '2'], ["'resnet19'", 'resnet18']),
    ('unknown-model-tagged', ['info', 'resnet19.a1_in1k', '--num-classes', '2'], ["'resnet19.a1_in1k'"]),
    ('unknown-model-strip', STRIP + ['--model', 'resnet19'], ["'resnet19'"]),
    ('unknown-model-eval', ['eval', '--model', 'resnet19', '--checkpoint', '{w}/ckpt.pth.tar', '--data-dir',
                            '{w}/data'], ["'resnet19'"]),
    ('hub-model-eval', ['eval', '--model', 'hf-hub:timm/resnet18.a1_in1k', '--data-dir', '{w}/data'],
     ["'hf-hub:timm/resnet18.a1_in1k'"]),
    # the existing-folder error speaks CLI
    ('existing-out', ['strip', '{w}/ckpt.pth.tar', '--branch', '0', '--out', '{w}/existing'], ['--force']),
    # numbers out of range, refused while parsing
    ('max-drop-nan', CURVE + ['--max-drop', 'nan'], ['--max-drop', 'nan']),
    ('max-drop-negative', CURVE + ['--max-drop', '-1'], ['--max-drop']),
    ('calib-limit-0', CURVE + ['--calib-limit', '0'], ['--calib-limit', '>= 1']),
    ('batch-size-0', EVAL + ['--batch-size', '0'], ['--batch-size', '>= 1']),
    ('branch-negative', ['strip', '{w}/ckpt.pth.tar', '--branch', '-1', '--out', '{w}/out'], ['--branch']),
    ('taps-empty', ['info', 'resnet18', '--num-classes', '2', '--taps', ','], ['--taps']),
    # an empty calibration set (class folders without images)
    ('empty-calibration', ['exit-curve', '--model', 'sila_resnet18', '--checkpoint', '{w}/ckpt.pth.tar',
                           '--data-dir', '{w}/data', '--calib-split', 'empty'], ['empty']),
]


@pytest.mark.parametrize('argv,fragments', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(work, capfd, argv, fragments):
    before = snapshot(work, folders=True)
    assert main([a.replace('{w}', str(work)) for a in argv]) == 2
    _expect_one_line(capfd, *(f.replace('{w}', str(work)) for f in fragments))
    assert snapshot(work, folders=True) == before


# --- the operating system refuses a write or a read ------------------------------------------------------------
@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG (as on a full disk) instead of killing the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def _unprivileged():
    """Run as user `nobody` for a while when root (root ignores file permissions); as is otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_file_too_large_is_one_line_and_leaves_nothing(work, capfd):
    out = work / 'big'
    with _file_size_limit(1 << 20):  # the 45 MB model.safetensors cannot be written
        rc = main(['strip', str(work / 'ckpt.pth.tar'), '--branch', '0', '--out', str(out)])
    assert rc == 2
    _expect_one_line(capfd, 'File too large', str(out))
    assert not out.exists()


def test_file_too_large_keeps_the_previous_export(work, capfd, tmp_path):
    out = work / 'again'
    assert main(['strip', str(work / 'ckpt.pth.tar'), '--branch', '1', '--out', str(out)]) == 0
    capfd.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with _file_size_limit(1 << 20):
        rc = main(['strip', str(work / 'ckpt.pth.tar'), '--branch', '0', '--out', str(out), '--force'])
    assert rc == 2
    _expect_one_line(capfd, 'File too large')
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shutil.rmtree(out)


def test_disk_full_is_one_line_and_leaves_nothing(work, capfd, tmpfs):
    small_tmpfs = tmpfs('2m')
    out = small_tmpfs / 'out'
    assert main(['strip', str(work / 'ckpt.pth.tar'), '--branch', '0', '--out', str(out)]) == 2
    line = _expect_one_line(capfd, 'No space left on device')
    assert 'disk is full' in line
    assert list(small_tmpfs.iterdir()) == []


def test_permission_denied_is_one_line_and_writes_nothing(work, capfd):
    locked = work / 'locked'
    locked.mkdir(mode=0o755)
    os.chmod(locked, 0o555)  # nobody may create anything inside
    secret = work / 'secret.pth.tar'
    shutil.copy(work / 'ckpt.pth.tar', secret)
    os.chmod(secret, 0o000)
    try:
        with _unprivileged():
            rc_write = main(['strip', str(work / 'ckpt.pth.tar'), '--branch', '0', '--out', str(locked / 'out')])
            first = capfd.readouterr()
            rc_read = main(['strip', str(secret), '--branch', '0', '--out', str(work / 'out_secret')])
    finally:
        os.chmod(locked, 0o755)
        secret.unlink()
    assert rc_write == 2 and rc_read == 2
    lines = first.err.strip().splitlines()
    assert len(lines) == 1 and 'Permission denied' in lines[0] and str(locked) in lines[0], first.err
    assert first.out == '' and list(locked.iterdir()) == []
    _expect_one_line(capfd, 'Permission denied', str(secret))
    assert not (work / 'out_secret').exists()


# --- --json: stdout is the JSON document and nothing else -------------------------------------------------------
def test_json_output_is_never_mixed_with_other_text(work, capfd):
    runs = [
        ['info', 'sila_resnet18', '--num-classes', '2', '--json'],
        ['strip', str(work / 'ckpt.pth.tar'), '--branch', '1', '--out', str(work / 'json_out'), '--json'],
        [a.replace('{w}', str(work)) for a in EVAL] + ['--json'],  # progress bar on by default: must go elsewhere
        [a.replace('{w}', str(work)) for a in CURVE] + ['--points', '3', '--batch-size', '2', '--json'],
    ]
    try:
        for argv in runs:
            assert main(argv) == 0, argv
            out = capfd.readouterr().out
            json.loads(out)  # the whole of stdout is one JSON document
            assert out.lstrip().startswith('{') and out.rstrip().endswith('}')
    finally:
        shutil.rmtree(work / 'json_out', ignore_errors=True)
