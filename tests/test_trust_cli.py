"""`timm-sila`'s promise for expected failures: exit status 2, exactly one line on stderr naming what is wrong,
nothing on stdout and nothing written. Table-driven over hostile and clumsy inputs (issue 11 §4), plus a full disk
(a file size limit everywhere; a small tmpfs where the machine allows mounting), permission denied, and `--json`
runs whose stdout is the JSON document alone. Also `benchmarks/coverage.py --report-only` without results.
"""
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

from timm_sila_cli import main

REPO = Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b'caf\xe9')  # latin-1 bytes: not valid UTF-8 (a surrogate escape in Python's str)


def _snapshot(root: Path):
    """Every file and folder under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob('*'))}


def _image_folder(root: Path, splits=('test', 'val'), classes=2, n=3):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in range(classes):
            (root / split / f'c{c}').mkdir(parents=True)
            for i in range(n):
                px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / f'c{c}' / f'{i}.png')


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A folder (readable by everyone, for the permission checks) with a train.py-style checkpoint, an image
    folder, a non-empty export folder and stripped folders with broken config.json files."""
    root = Path(tempfile.mkdtemp(prefix='timm-sila-trust-'))
    os.chmod(root, 0o755)
    torch.manual_seed(0)
    net = timm.create_model('sila_resnet18', num_classes=2)
    args = dict(model='sila_resnet18', num_classes=2, model_kwargs={}, img_size=32, interpolation='')
    torch.save(dict(arch='sila_resnet18', state_dict=net.state_dict(), args=args), root / 'ckpt.pth.tar')
    os.chmod(root / 'ckpt.pth.tar', 0o644)
    _image_folder(root / 'data')
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
    before = _snapshot(work)
    assert main([a.replace('{w}', str(work)) for a in argv]) == 2
    _expect_one_line(capfd, *(f.replace('{w}', str(work)) for f in fragments))
    assert _snapshot(work) == before


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


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MB tmpfs, where the machine lets this process mount one (root in a container); else skipped."""
    mount = tmp_path / 'tmpfs'
    mount.mkdir()
    if shutil.which('mount') is None or os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root and mount(8)')
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.decode(errors="replace").strip()}')
    try:
        yield mount
    finally:
        subprocess.run(['umount', str(mount)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing(work, capfd, small_tmpfs):
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


# --- benchmarks/coverage.py --report-only on a fresh clone --------------------------------------------------------
def test_coverage_report_only_without_results_refuses_and_keeps_the_report(tmp_path):
    doc = REPO / 'docs' / 'coverage.md'
    before = doc.read_bytes()
    for results in (tmp_path / 'missing.jsonl', tmp_path / 'empty.jsonl'):
        if results.name == 'empty.jsonl':
            results.write_text('\n')
        run = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'coverage.py'), '--report-only',
                              '--results', str(results)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and str(results) in lines[0] and 'left as it is' in lines[0], run.stderr
        assert run.stdout == ''
    assert doc.read_bytes() == before


def _coverage_module():
    """benchmarks/coverage.py imported as a module (it is a script, not part of the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('sila_coverage', REPO / 'benchmarks' / 'coverage.py')
    coverage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(coverage)
    return coverage


def test_coverage_param_count_shows_progress(capsys, tmp_path):
    coverage = _coverage_module()
    names = timm.list_models('test_*')[:3]
    counts = coverage.param_counts(tmp_path / 'params.json', names=names)
    assert set(counts) == set(names)
    assert all(counts[n] == sum(p.numel() for p in timm.create_model(n).parameters()) for n in names)
    captured = capsys.readouterr()
    assert 'counting parameters of 3 architectures' in captured.err and 'counted 3' in captured.err
    assert captured.out == ''


def test_coverage_results_line_cut_short_is_skipped_and_the_report_written_whole(tmp_path, capsys):
    coverage = _coverage_module()
    results = tmp_path / 'results.jsonl'
    whole = dict(arch='test_resnet', family='test', status='pass', check=None, reason='', checks={})
    results.write_text(json.dumps(whole) + '\n' + json.dumps(dict(whole, arch='test_vit'))[:40])  # killed mid-append
    assert list(coverage.load_results(results)) == ['test_resnet']
    assert f'{results}:2: not a whole result record, skipped' in capsys.readouterr().err
    coverage._end_line(results)  # what a resumed sweep does before appending: the next record is whole
    with open(results, 'a') as f:
        f.write(json.dumps(dict(whole, arch='test_vit')) + '\n')
    assert list(coverage.load_results(results)) == ['test_resnet', 'test_vit']
    doc = tmp_path / 'coverage.md'
    doc.write_text('previous report')
    coverage.write_report(coverage.load_results(results), [('test', 'test_resnet'), ('test', 'test_vit')], doc,
                          'python benchmarks/coverage.py')
    text = doc.read_text()
    assert text.startswith('# Coverage') and 'test_resnet' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['coverage.md', 'results.jsonl']  # no temp left behind


def test_coverage_groups_export_failures_by_step_and_root_cause():
    coverage = _coverage_module()
    long = ('ExportError: torch.onnx cannot convert {} to ONNX opset 18: ConversionError: Failed to decompose the FX '
            'graph for ONNX compatibility. Cause: ValueError: Cannot view a tensor with shape torch.Size([s77, {}, 3, '
            '32]) and strides (384, 32, 128, 1) as a tensor with shape (s77, 4, 96)! [export.py:284]')
    a = coverage._export_failure(long.format('beit_base_patch16_224 branch 0', 5))
    b = coverage._export_failure(long.format('sila_test_vit_relpos branch 1', 4)[:330])  # recorded reasons are cut
    assert a == b and a[0] == 'torch.onnx FX decomposition' and a[1].startswith('ValueError: Cannot view a tensor')
    assert coverage._export_failure('ExportError: torch.export cannot trace sila_x branch 1: '
                                    'GuardOnDataDependentSymNode: data-dependent u0 [export.py:203]') == (
        'torch.export tracing', 'GuardOnDataDependentSymNode: data-dependent uN')
