"""The one atomic writer (`timm_sila.io.atomic`) and its rules, the same for every writer: strip, export,
EarlyExit.save, write_model_card and exit-curve --save / --png.

1. An existing output is replaced only with overwrite (--force), never when it is an input of the same call.
2. The last step creates without replacing: a file that appears at the output while the writer runs is kept.
3. In a folder, overwrite replaces only files timm-sila wrote (its manifest); `card=False` removes its old card.
4. Whole old set or whole new set at every instant: an interrupt at any step of the commit, a killed writer, a
   failed write, two writers at once.
Each refusal is one line (CLI: exit status 2), leaves the existing files' bytes as they were and no temp file.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import timm
from safetensors.torch import save_file

import timm_sila.io.atomic as atomic
import timm_sila.ship.strip as shipping
from conftest import branch_logits, build_sila, eval_logits, image_folder, train_py_checkpoint
from timm_sila import SilaNet, load_stripped, strip
from timm_sila.io.atomic import (
    MANIFEST_NAME, MARKER_NAME, TMP_PREFIX, ForeignFilesError, OutputBusyError, OutputExistsError, OutputWriteError,
    SourceInOutputError, atomic_output_dir, atomic_write_file, check_output_dir, read_manifest)
from timm_sila.exits.early_exit import EarlyExit
from timm_sila.ship.strip import write_model_card
from timm_sila_cli import main

ARCH = 'sila_test_resnet'  # timm's 0.4M-parameter test ResNet: taps layer3, layer1
EXPORT = sorted(['README.md', 'config.json', 'model.safetensors', MANIFEST_NAME])
MINE = b'the user\'s own file\n'


# --- fixtures and helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def net():
    return build_sila('test_resnet', 2)[0].eval()


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, net):
    """A checkpoint and an image folder (test, val) that the commands read."""
    root = tmp_path_factory.mktemp('given')
    train_py_checkpoint(root / 'ckpt.pth.tar', net, ARCH, img_size=32)
    image_folder(root / 'data', n=2, splits=('test', 'val'))
    return root


def tree(*roots: Path) -> dict:
    """Every path under the roots, hidden ones included: the bytes of each file, 'dir' for a folder."""
    return {str(p): 'dir' if p.is_dir() and not p.is_symlink() else
            (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for root in roots for p in sorted(root.rglob('*'))}


def temps(root: Path) -> list:
    return [str(p) for p in root.rglob(f'{TMP_PREFIX}*')]


def contents(folder: Path) -> dict:
    """{name: bytes} of the files in folder (its temp folders are checked with `temps`)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.is_dir()}


def one_line(capsys, *fragments, at_once=False) -> str:
    """The one error line on stderr (besides exit-curve's progress and warning lines, unless `at_once`: refused
    before any work), nothing on stdout."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines()
             if at_once or not line.startswith(('exit-curve:', 'timm-sila exit-curve: warning:'))]
    assert len(lines) == 1 and lines[0].startswith('timm-sila ') and ': error: ' in lines[0], captured.err
    assert 'Traceback' not in captured.err and captured.out == ''
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@contextlib.contextmanager
def appearing(path: Path):
    """A file of the user's appears at `path` right after the writer wrote its temp files (before the commit)."""
    real = atomic._finish

    def finish(tmp, target):
        names = real(tmp, target)
        path.write_bytes(MINE)
        return names
    atomic._finish = finish
    try:
        yield
    finally:
        atomic._finish = real


# --- rules 1 and 2, table-driven over the writers ----------------------------------------------------------------
def _strip_folder(folder: Path, net, card: bool = True) -> Path:
    return strip(net, 1, folder, card=card)


CURVE = ['exit-curve', '--model', ARCH, '--checkpoint', '{ckpt}', '--data-dir', '{data}', '--calib-split', 'val',
         '--batch-size', '4', '--points', '3', '--img-size', '32', '--json']


def _writer(name: str, tmp: Path, inputs: Path, net):
    """(run(target, force) -> raises or returns the CLI exit status, the file this writer writes in `target`, or
    None when the target itself is that file, is_cli)."""
    ckpt, data = inputs / 'ckpt.pth.tar', inputs / 'data'
    fill = lambda argv, target: [a.format(ckpt=ckpt, data=data, out=target) for a in argv]
    if name == 'strip':
        return (lambda target, force: main(fill(['strip', '{ckpt}', '--branch', '1', '--out', '{out}']
                                                + ['--force'] * force, target)), 'model.safetensors', True)
    if name == 'export':
        return (lambda target, force: main(fill(['export', '{ckpt}', '--branch', '1', '--format', 'pt2', '--out',
                                                 '{out}'] + ['--force'] * force, target)), None, True)
    if name == 'EarlyExit.save':
        ee = EarlyExit(net, thresholds=0.5, input_size=(3, 32, 32))
        return (lambda target, force: ee.save(target, overwrite=force)), None, False
    if name == 'write_model_card':
        return (lambda target, force: write_model_card(target, overwrite=force)), 'README.md', False
    if name in ('exit-curve --save', 'exit-curve --png'):
        flag = name.split()[1]
        return (lambda target, force: main(fill(CURVE + [flag, '{out}'] + ['--force'] * force, target)), None, True)
    if name == 'exit-curve --png --save':  # one run, both files: the curve and the calibrated EarlyExit beside it
        return (lambda target, force: main(fill(CURVE + ['--png', '{out}', '--save', str(target.with_suffix(
            '.safetensors'))] + ['--force'] * force, target)), None, True)
    raise KeyError(name)


WRITERS = ['strip', 'export', 'EarlyExit.save', 'write_model_card', 'exit-curve --save', 'exit-curve --png']
FOLDER_WRITERS = ('strip', 'write_model_card')


def _target(name: str, tmp: Path, net) -> Path:
    if name == 'write_model_card':  # a strip folder without a card
        return _strip_folder(tmp / 'out', net, card=False)
    if name.startswith('exit-curve --png'):
        return tmp / 'curve.png'
    return tmp / {'strip': 'out', 'export': 'm.pt2'}.get(name, 'exit.safetensors')


def _expect_refusal(result, is_cli, capsys, error, *fragments, at_once=False):
    if is_cli:
        assert result == 2
        one_line(capsys, *fragments, at_once=at_once)
    else:
        assert isinstance(result, error), result
        for fragment in fragments:
            assert fragment in str(result), (fragment, str(result))


def _run(run, target, force):
    try:
        return run(target, force)
    except (OSError, ValueError) as e:
        return e


@pytest.mark.parametrize('name', WRITERS)
def test_existing_output_needs_force(name, tmp_path, inputs, net, capsys):
    run, inner, is_cli = _writer(name, tmp_path, inputs, net)
    target = _target(name, tmp_path, net)
    if name == 'strip':
        target.mkdir()
    (target / inner if inner else target).write_bytes(MINE)
    before = tree(tmp_path, inputs)
    option = '--force' if is_cli else 'overwrite=True'
    said = f'({option} replaces only files timm-sila wrote)' if name == 'strip' else f'pass {option}'
    _expect_refusal(_run(run, target, False), is_cli, capsys, OutputExistsError, 'exists', said, at_once=True)
    assert tree(tmp_path, inputs) == before and not temps(tmp_path)


# (writer, the input the output is pointed at); with --force / overwrite=True each is refused all the same
ONTO_INPUT = [
    ('strip', 'folder holding the checkpoint'),
    ('strip', 'folder holding the metrics'),
    ('export', 'checkpoint'),
    ('write_model_card', 'metrics is the card'),
    ('exit-curve --save', 'checkpoint'),
    ('exit-curve --png', 'checkpoint'),
    ('exit-curve --png', 'image folder'),
    ('exit-curve --save', 'calibration image folder'),
]


@pytest.mark.parametrize('name,where', ONTO_INPUT, ids=[f'{n}-{w}' for n, w in ONTO_INPUT])
def test_output_onto_an_input_refused_even_with_force(name, where, tmp_path, inputs, net, capsys):
    run, _, is_cli = _writer(name, tmp_path, inputs, net)
    ckpt = tmp_path / 'ckpt.pth.tar'
    shutil.copy2(inputs / 'ckpt.pth.tar', ckpt)
    if name == 'strip':
        target = tmp_path / 'out'
        target.mkdir()
        if where.endswith('checkpoint'):
            shutil.copy2(ckpt, target / 'last.pth.tar')
            argv = ['strip', str(target / 'last.pth.tar'), '--branch', '1', '--out', str(target), '--force']
        else:
            (target / 'eval.json').write_text(json.dumps(dict(branches=[dict(branch=1, top1=50.0)])))
            argv = ['strip', str(ckpt), '--branch', '1', '--out', str(target), '--force', '--metrics',
                    str(target / 'eval.json')]
        run = lambda target, force: main(argv)
    elif name == 'write_model_card':
        target = _strip_folder(tmp_path / 'out', net)
        run = lambda target, force: write_model_card(target, target / 'README.md', overwrite=True)
    elif name == 'export':
        target = ckpt
        run = lambda target, force: main(['export', str(ckpt), '--branch', '1', '--format', 'pt2', '--out',
                                          str(target), '--force'])
    elif where == 'checkpoint':
        target = inputs / 'ckpt.pth.tar'
    else:
        target = inputs / 'data' / ('val' if 'calibration' in where else 'test') / 'c0' / 'new.png'
    before = tree(tmp_path, inputs)
    _expect_refusal(_run(run, target, True), is_cli, capsys, SourceInOutputError, ' input', at_once=True)
    assert tree(tmp_path, inputs) == before and not temps(tmp_path) and not temps(inputs)


@pytest.mark.parametrize('name', [w for w in WRITERS if w != 'exit-curve --save'])  # --save is EarlyExit.save
def test_file_appearing_while_writing_is_kept(name, tmp_path, inputs, net, capsys):
    """Without --force the last step creates without replacing: a file put at the output meanwhile survives."""
    run, inner, is_cli = _writer(name, tmp_path, inputs, net)
    target = _target(name, tmp_path, net)
    appears = target / inner if inner else target
    before = tree(tmp_path, inputs)
    with appearing(appears):
        result = _run(run, target, False)
    option = '--force' if is_cli else 'overwrite=True'
    _expect_refusal(result, is_cli, capsys, OutputExistsError, 'appeared', f'Pass {option}')
    after = tree(tmp_path, inputs)
    assert after.pop(str(appears)) == MINE and not temps(tmp_path)
    if name == 'strip':  # the folder this call created stays: it holds the user's file
        assert after.pop(str(target)) == 'dir'
    assert after == before


@pytest.mark.parametrize('name', FOLDER_WRITERS)
def test_file_appearing_while_forcing_is_kept(name, tmp_path, inputs, net, capsys):
    """With --force an output file is replaced only when it is the one timm-sila wrote: one put there after the
    check is moved aside, found not to be timm-sila's, and put back."""
    run, inner, is_cli = _writer(name, tmp_path, inputs, net)
    target = _strip_folder(tmp_path / 'out', net, card=name == 'strip')
    before = tree(tmp_path, inputs)
    with appearing(target / inner):
        result = _run(run, target, True)
    _expect_refusal(result, is_cli, capsys, ForeignFilesError, inner, 'did not write')
    after = tree(tmp_path, inputs)
    assert after.pop(str(target / inner)) == MINE and not temps(tmp_path)
    before.pop(str(target / inner), None)
    assert after == before


@pytest.mark.parametrize('name', WRITERS[:4] + ['exit-curve --png --save'])
def test_force_replaces_what_timm_sila_wrote(name, tmp_path, inputs, net, capsys):
    run, inner, is_cli = _writer(name, tmp_path, inputs, net)
    target = _target(name, tmp_path, net)
    assert _run(run, target, False) in (0, None, target / 'README.md')
    first = tree(tmp_path)
    assert len(first) >= 2 if name.startswith('exit-curve') else first
    assert _run(run, target, True) in (0, None, target / 'README.md')
    capsys.readouterr()
    assert set(tree(tmp_path)) == set(first) and not temps(tmp_path)


def test_exit_curve_png_and_save_must_differ(tmp_path, inputs, capsys):
    argv = [a.format(ckpt=inputs / 'ckpt.pth.tar', data=inputs / 'data') for a in CURVE]
    assert main(argv + ['--png', str(tmp_path / 'x'), '--save', str(tmp_path / 'x')]) == 2
    one_line(capsys, '--png and --save')
    assert list(tmp_path.iterdir()) == []


# --- rule 3: --force replaces only files timm-sila wrote ------------------------------------------------------------
def _user_readme(out):
    (out / 'README.md').write_bytes(MINE)


def _user_notes(out):
    (out / 'notes.txt').write_bytes(MINE)


def _edited_config(out):
    (out / 'config.json').write_text((out / 'config.json').read_text() + ' ')


def _older_version(out):  # written before manifests existed
    (out / MANIFEST_NAME).unlink()


def _corrupt_manifest(out):
    (out / MANIFEST_NAME).write_text('{"writer": "timm-sila", "files": ')


def _foreign_manifest(out):
    (out / MANIFEST_NAME).write_text(json.dumps(dict(writer='someone-else', files=read_manifest(out))))


def _user_folder(out):
    (out / f'{TMP_PREFIX}mine').mkdir()
    (out / f'{TMP_PREFIX}mine' / 'notes.txt').write_bytes(MINE)


def _weights_symlink(out):
    (out / 'elsewhere.safetensors').write_bytes((out / 'model.safetensors').read_bytes())
    (out / 'model.safetensors').unlink()
    (out / 'model.safetensors').symlink_to('elsewhere.safetensors')


def _manifest_is_a_folder(out):
    (out / MANIFEST_NAME).unlink()
    (out / MANIFEST_NAME).mkdir()
    (out / MANIFEST_NAME / 'notes.txt').write_bytes(MINE)


# (how the folder an earlier strip wrote (branch 1, no card) was changed, the names the error must list)
FOREIGN = {
    'user README.md': (_user_readme, ['README.md']),
    'user notes.txt': (_user_notes, ['notes.txt']),
    'edited config.json': (_edited_config, ['config.json (changed since timm-sila wrote it)']),
    'older version, no manifest': (_older_version, ['config.json', 'model.safetensors', 'this folder has no valid one']),
    'corrupt manifest': (_corrupt_manifest, ['config.json', 'model.safetensors']),
    'manifest of another writer': (_foreign_manifest, ['config.json', 'model.safetensors']),
    'user folder with the temp prefix': (_user_folder, [f'{TMP_PREFIX}mine (a folder)']),
    'weights replaced by a symlink': (_weights_symlink, ['elsewhere.safetensors', 'model.safetensors']),
    'manifest is a folder': (_manifest_is_a_folder, [f'{MANIFEST_NAME} (not a plain file)']),
}


@pytest.mark.parametrize('card', [True, False], ids=['card', 'no-card'])
@pytest.mark.parametrize('change', FOREIGN, ids=list(FOREIGN))
def test_force_refuses_files_timm_sila_did_not_write(change, card, tmp_path, inputs, net, capsys):
    out = _strip_folder(tmp_path / 'out', net, card=False)
    make, names = FOREIGN[change]
    make(out)
    before = tree(tmp_path)
    with pytest.raises(ForeignFilesError, match='overwrite=True replaces only files timm-sila wrote') as info:
        strip(net, 0, out, overwrite=True, card=card)
    for name in names:
        assert name in str(info.value)
    assert tree(tmp_path) == before
    argv = ['strip', str(inputs / 'ckpt.pth.tar'), '--branch', '0', '--out', str(out), '--force']
    assert main(argv + ([] if card else ['--no-card'])) == 2
    one_line(capsys, '--force replaces only files timm-sila wrote', 'move', names[0])
    assert tree(tmp_path) == before and not [t for t in temps(tmp_path) if not t.endswith('mine')]


def test_no_card_removes_the_card_timm_sila_wrote(tmp_path, net):
    out = strip(net, 1, tmp_path / 'out')
    assert sorted(os.listdir(out)) == EXPORT
    strip(net, 0, out, overwrite=True, card=False)  # a card describing branch 1 beside branch 0 would be wrong
    assert sorted(os.listdir(out)) == sorted(['config.json', 'model.safetensors', MANIFEST_NAME])
    assert set(read_manifest(out)) == {'config.json', 'model.safetensors'}
    assert type(load_stripped(out)).__name__ == 'ResNet'
    strip(net, 1, out, overwrite=True)  # the card comes back with the next strip that writes one
    assert sorted(os.listdir(out)) == EXPORT and 'branch 1' in (out / 'README.md').read_text()


@pytest.mark.parametrize('weights_mode', [0o600, 0o200], ids=['owner-only', 'write-only'])
def test_overwriting_a_folder_keeps_each_file_mode(tmp_path, net, weights_mode):
    """--force replaces files with the permission bits the user gave them (even ones that deny reading, and never
    a setuid bit); a file written for the first time gets the umask's mode."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = strip(net, 1, tmp_path / 'out', card=False)
    (out / 'model.safetensors').chmod(weights_mode)
    (out / 'config.json').chmod(0o4640)
    strip(net, 1, out, overwrite=True)  # with the card this time
    assert (out / 'model.safetensors').stat().st_mode & 0o7777 == weights_mode
    assert (out / 'config.json').stat().st_mode & 0o7777 == 0o640
    assert (out / 'README.md').stat().st_mode & 0o7777 == 0o666 & ~umask


def test_manifest_lists_what_was_written(tmp_path, net):
    import hashlib
    out = strip(net, 2, tmp_path / 'out')
    assert read_manifest(out) == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                  for p in out.iterdir() if p.name != MANIFEST_NAME}


def test_card_writer_keeps_the_folder_and_updates_its_manifest(tmp_path, net):
    out = strip(net, 1, tmp_path / 'out', card=False)
    weights = (out / 'model.safetensors').read_bytes()
    write_model_card(out)
    assert sorted(os.listdir(out)) == EXPORT and (out / 'model.safetensors').read_bytes() == weights
    assert set(read_manifest(out)) == {'README.md', 'config.json', 'model.safetensors'}
    write_model_card(out, dict(num_samples=8, branches=[dict(branch=1, top1=12.5)]), overwrite=True)
    assert '12.50' in (out / 'README.md').read_text()
    strip(net, 0, out, overwrite=True)  # a card timm-sila wrote is replaced like the rest
    assert 'Branch 0' in (out / 'README.md').read_text()


def test_names_writer_keeps_other_files_whole_folder_writer_refuses_them(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_bytes(MINE)
    with atomic_output_dir(out, names=['a.bin'], commit_last='a.bin') as tmp:
        (tmp / 'a.bin').write_bytes(b'a')
    assert contents(out)['notes.txt'] == MINE and contents(out)['a.bin'] == b'a'
    with pytest.raises(OutputExistsError, match='a.bin exists'):
        with atomic_output_dir(out, names=['a.bin'], commit_last='a.bin') as tmp:
            (tmp / 'a.bin').write_bytes(b'b')
    with pytest.raises(ForeignFilesError, match='notes.txt'):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / 'config.json').write_text('{}')
    with pytest.raises(OutputWriteError, match='beyond the files it may write'):
        with atomic_output_dir(out, overwrite=True, names=['a.bin'], commit_last='a.bin') as tmp:
            (tmp / 'a.bin').write_bytes(b'b')
            (tmp / 'other.bin').write_bytes(b'b')
    assert contents(out)['a.bin'] == b'a' and not temps(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / 'new') as tmp:
            (tmp / 'config.json').write_text('{}')
            raise RuntimeError('writer failed')
    assert not (tmp_path / 'new').exists()


# --- rule 5: whole old or whole new at every step of the commit --------------------------------------------------
_FS_CALLS = ('replace', 'rename', 'link', 'unlink', 'rmdir')


@contextlib.contextmanager
def interrupted(at=(), after=None):
    """Count the calls of os.replace / rename / link / unlink / rmdir; raise KeyboardInterrupt before the n-th
    for n in `at`; run `after[n]()` after the n-th. Yields the list of calls."""
    calls, real, after = [], {name: getattr(os, name) for name in _FS_CALLS}, after or {}

    def wrap(name):
        def call(*args, **kwargs):
            calls.append(name)
            n = len(calls)
            if n in at:
                raise KeyboardInterrupt(f'injected at {name} call {n}')
            result = real[name](*args, **kwargs)
            if n in after:
                after[n]()
            return result
        return call
    for name in _FS_CALLS:
        setattr(os, name, wrap(name))
    try:
        yield calls
    finally:
        for name in _FS_CALLS:
            setattr(os, name, real[name])


def _no_hard_links(*args, **kwargs):
    raise OSError(errno.EPERM, 'Operation not permitted')


@pytest.fixture(params=['hard links', 'no hard links'])
def link_mode(request, monkeypatch):
    if request.param == 'no hard links':  # and no RENAME_NOREPLACE: the commit's steps are os calls to interrupt
        monkeypatch.setattr(os, 'link', _no_hard_links)
        monkeypatch.setattr(atomic, '_renameat2', lambda: None)
    return request.param


@pytest.mark.parametrize('new_card', [True, False], ids=['card', 'no-card'])
def test_interrupt_at_every_step_of_a_folder_commit(tmp_path, net, new_card, link_mode):
    """strip --force over an earlier folder, a KeyboardInterrupt injected at each file-system call in turn (and,
    to interrupt the undo too, at the call after it): after the next writer's recovery the folder holds exactly
    the old files or exactly the new ones, and no temp folder is left."""
    old_dir = strip(net, 2, tmp_path / 'old')
    old = contents(old_dir)
    work = tmp_path / 'out'
    shutil.copytree(old_dir, work)
    with interrupted() as calls:
        strip(net, 1, work, overwrite=True, card=new_card)
    new = contents(work)
    assert new != old and ('README.md' in new) == new_card and not temps(tmp_path)
    undone = []
    for at in [(n,) for n in range(1, len(calls) + 1)]:
        shutil.rmtree(work)
        shutil.copytree(old_dir, work)
        with pytest.raises(KeyboardInterrupt):
            with interrupted(at):
                strip(net, 1, work, overwrite=True, card=new_card)
        check_output_dir(work, overwrite=True)  # what the next writer does first: settle, then check
        state = contents(work)
        assert state in (old, new), (at, sorted(state))
        assert not temps(tmp_path), at
        if state == old:
            undone.append(at[0])
    assert 0 < len(undone) < len(calls)  # the injections reached both sides of the commit point
    for n in undone:  # the undo itself interrupted at its first step
        shutil.rmtree(work)
        shutil.copytree(old_dir, work)
        with pytest.raises(KeyboardInterrupt):
            with interrupted((n, n + 1)):
                strip(net, 1, work, overwrite=True, card=new_card)
        check_output_dir(work, overwrite=True)
        assert contents(work) == old and not temps(tmp_path), n


@pytest.mark.parametrize('overwrite', [True, False], ids=['replace', 'create'])
def test_interrupt_at_every_step_of_a_file_commit(tmp_path, overwrite, link_mode):
    path = tmp_path / 'exit.safetensors'

    def reset():
        path.unlink(missing_ok=True)
        if overwrite:
            path.write_bytes(b'old')
    reset()
    with interrupted() as calls:
        atomic_write_file(path, lambda p: p.write_bytes(b'new'), overwrite=overwrite)
    seen = set()
    for at in [(n,) for n in range(1, len(calls) + 1)] + [(n, n + 1) for n in range(1, len(calls))]:
        reset()
        with pytest.raises(KeyboardInterrupt):
            with interrupted(at):
                atomic_write_file(path, lambda p: p.write_bytes(b'new'), overwrite=overwrite)
        atomic._remove_abandoned(tmp_path)  # what the next writer does first
        state = sorted(os.listdir(tmp_path)), path.read_bytes() if path.exists() else None
        assert state in ((['exit.safetensors'], b'new'), (['exit.safetensors'], b'old') if overwrite else ([], None))
        seen.add(state[1])
    assert seen == {b'new', b'old' if overwrite else None}


@pytest.mark.skipif(sys.platform == 'win32', reason='signals')
@pytest.mark.parametrize('signum', ['SIGINT', 'SIGTERM'])
def test_signal_during_commit_is_held_until_it_is_settled(tmp_path, net, signum):
    """A real signal arriving while the files are renamed is delivered once the commit is settled: the folder
    holds the whole new set (not an undone one), the handlers are back, the signal still arrives."""
    out = strip(net, 2, tmp_path / 'out')
    sig = getattr(signal, signum)
    received = []

    def handler(s, frame):
        received.append(s)
        raise KeyboardInterrupt
    previous = signal.signal(sig, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupted(after={3: lambda: os.kill(os.getpid(), sig)}):  # after the first move aside
                strip(net, 1, out, overwrite=True)
        assert signal.getsignal(sig) is handler and received == [sig]
    finally:
        signal.signal(sig, previous)
    assert load_stripped(out).branch == 1 and sorted(os.listdir(out)) == EXPORT
    assert not temps(tmp_path)


KILLED_MID_COMMIT = r'''
import os, signal, sys, timm, timm_sila
real, calls = {n: getattr(os, n) for n in ('replace', 'link')}, []
def wrap(name):
    def call(*args, **kwargs):
        calls.append(name)
        real[name](*args, **kwargs)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    return call
for n in real:
    setattr(os, n, wrap(n))
timm_sila.strip(timm.create_model('sila_test_resnet', num_classes=2), 0, sys.argv[1], overwrite=True)
'''


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
@pytest.mark.parametrize('calls,result', [(2, 'old'), (5, 'old'), (7, 'old'), (9, 'new')],
                         ids=['config aside', 'all aside', 'two new in', 'config in'])
def test_kill_mid_commit_next_writer_settles(net, tmp_path, calls, result, caplog):
    """Killed (SIGKILL) after the n-th rename or link of the commit (1: the hard-link probe; 2-5: the four old
    files aside, config.json first; 6-9: the new ones in, config.json last)."""
    out = strip(net, 2, tmp_path / 'out')
    before = contents(out)
    run = subprocess.run([sys.executable, '-c', KILLED_MID_COMMIT, str(out), str(calls)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -9, run.stderr
    if result == 'old':
        assert not (out / 'config.json').exists()  # killed mid-commit: no config beside other weights
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        with pytest.raises(OutputExistsError):
            strip(net, 1, out)  # the next writer settles the commit first
    assert 'killed' in caplog.text
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    if result == 'old':
        assert 'restored the previous' in caplog.text and contents(out) == before
        assert load_stripped(out).branch == 2
    else:
        assert type(load_stripped(out)).__name__ == 'ResNet'


@pytest.mark.parametrize('interrupt', [False, True], ids=['appeared', 'appeared-then-interrupted'])
def test_temp_folder_holding_previous_files_is_left_for_the_next_writer(tmp_path, net, caplog, interrupt):
    """A file put at config.json's name right after the commit moved the old one aside is kept; the undo cannot
    put the old one back, so the temp folder holding it is left, and stays until the user resolves it."""
    out = strip(net, 2, tmp_path / 'out')
    old = contents(out)
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        with pytest.raises(KeyboardInterrupt if interrupt else OutputExistsError, match=None if interrupt else
                           'config.json appeared while timm-sila was writing and was kept.*Move it elsewhere'):
            with interrupted(at=(5,) if interrupt else (), after={3: lambda: (out / 'config.json').write_bytes(MINE)}):
                strip(net, 1, out, overwrite=True)  # calls: 1 link probe, 2 its unlink, 3 config.json aside, ...
    left = [Path(p) for p in temps(tmp_path)]
    assert len(left) == 1 and (left[0] / 'previous' / 'config.json').read_bytes() == old['config.json']
    assert 'Left' in caplog.text
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        atomic._remove_abandoned(out)
    assert contents(out) == dict(old, **{'config.json': MINE})  # the rest of the old set is back
    assert (left[0] / 'previous' / 'config.json').read_bytes() == old['config.json'] and 'Kept' in caplog.text


# --- the writers' other guarantees: inputs, temp folders, concurrent writers, failed writes ---------------------
@pytest.mark.parametrize('where', ['inside', 'is_out_dir', 'is_weights_file', 'nested', 'symlinked_out_dir'])
def test_source_inside_output_refused(net, tmp_path, where):
    out = tmp_path / 'out'
    strip(net, 2, out)  # a previous export
    if where == 'inside':
        source = train_py_checkpoint(out / 'last.pth.tar', net, ARCH, img_size=32)
    elif where == 'nested':
        (out / 'runs').mkdir()
        source = train_py_checkpoint(out / 'runs' / 'last.pth.tar', net, ARCH, img_size=32)
    elif where == 'is_weights_file':
        save_file(net.state_dict(), str(out / 'full.safetensors'))
        os.replace(out / 'full.safetensors', out / 'model.safetensors')
        source = out / 'model.safetensors'
    elif where == 'is_out_dir':
        source = train_py_checkpoint(tmp_path / 'last.pth.tar', net, ARCH, img_size=32)
        out = source
    else:
        train_py_checkpoint(out / 'last.pth.tar', net, ARCH, img_size=32)
        (tmp_path / 'link').symlink_to(out)
        source, out = tmp_path / 'link' / 'last.pth.tar', out
    before = tree(tmp_path)
    with pytest.raises(SourceInOutputError, match='is or contains the input'):
        strip(source, 0, out, overwrite=True, model=ARCH)
    assert tree(tmp_path) == before


def _marker(folder: Path, info) -> Path:
    folder.mkdir()
    (folder / MARKER_NAME).write_text(info if isinstance(info, str) else json.dumps(info))
    (folder / 'model.safetensors').write_bytes(b'partial')
    return folder


def test_temp_folders_of_others_survive_abandoned_ones_are_removed(tmp_path, caplog):
    user = tmp_path / f'{TMP_PREFIX}my-notes'  # the user's own folder, sharing the prefix
    user.mkdir()
    (user / 'notes.txt').write_text('keep me')
    foreign = _marker(tmp_path / f'{TMP_PREFIX}foreign', '{"writer": "someone-else"}')
    unreadable = _marker(tmp_path / f'{TMP_PREFIX}garbage', 'not json')
    live = _marker(tmp_path / f'{TMP_PREFIX}live', {'writer': 'timm-sila', 'pid': os.getpid()})
    dead = _marker(tmp_path / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})
    link = tmp_path / f'{TMP_PREFIX}link'
    link.symlink_to(dead.parent.parent)  # a symlink with the prefix is never followed nor removed
    holder = os.open(live / MARKER_NAME, os.O_RDONLY)  # its writer is alive: it holds the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
            atomic_write_file(tmp_path / 'exit.safetensors', lambda p: p.write_bytes(b'new'))
    finally:
        os.close(holder)
    assert not dead.exists()
    assert 'Removed 1 temporary folder' in caplog.text and dead.name in caplog.text
    assert (user / 'notes.txt').read_text() == 'keep me'
    assert foreign.is_dir() and unreadable.is_dir() and live.is_dir() and link.is_symlink()


def test_abandoned_temp_folder_does_not_make_a_folder_non_empty(net, tmp_path, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    _marker(out / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})
    (out / f'{TMP_PREFIX}a1b2c3d4').mkdir()  # a removal cut short after its marker went: holds nothing
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        strip(net, 0, out)  # no overwrite needed: a killed writer's leftovers are not the user's files
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert 'killed' in caplog.text


CONCURRENT_WRITER = r'''
import importlib, os, sys, time, timm, timm_sila
S = importlib.import_module('timm_sila.ship.strip')
real = S.save_file
def slow(*args, **kwargs):
    real(*args, **kwargs)
    if sys.argv[2] != 'fast':  # hold the lock, weights in the temp folder, until told to go on
        print('writing', flush=True)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)
S.save_file = slow
try:
    timm_sila.strip(timm.create_model('sila_test_resnet', num_classes=10), int(sys.argv[3]), sys.argv[1])
except timm_sila.io.atomic.OutputError as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(2)
print('done', flush=True)
'''


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32', reason='flock')
def test_two_concurrent_writers_one_wins(tmp_path):
    out, go_on = tmp_path / 'out', tmp_path / 'go-on'
    first = subprocess.Popen([sys.executable, '-c', CONCURRENT_WRITER, str(out), str(go_on), '1'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == 'writing'  # holds the lock, weights in its temp folder
        second = subprocess.run([sys.executable, '-c', CONCURRENT_WRITER, str(out), 'fast', '2'],
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, 'the first writer was meant to still be writing'
    finally:
        go_on.touch()
        first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    assert second.stdout.startswith('OutputBusyError') and 'being written by another process' in second.stdout
    assert sorted(p.name for p in out.iterdir()) == EXPORT  # one complete export: the first writer's
    assert load_stripped(out).branch == 1


def test_locked_folder_refused_at_once(net, tmp_path):
    out = tmp_path / 'out'
    strip(net, 2, out)
    before = tree(tmp_path)
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(OutputBusyError, match='another process'):
            strip(net, 0, out, overwrite=True)
        assert time.monotonic() - started < 5
    finally:
        os.close(holder)
    assert tree(tmp_path) == before


@pytest.mark.parametrize('failure,error', [
    ('weights_is_a_folder', ForeignFilesError), ('config_is_a_folder', ForeignFilesError),
    ('rename_fails', OutputWriteError), ('link_fails', OutputWriteError), ('disk_full', OutputWriteError)])
def test_failed_overwrite_keeps_previous_export(net, tmp_path, monkeypatch, failure, error):
    out = tmp_path / 'out'
    strip(net, 2, out)
    if failure == 'weights_is_a_folder':  # the user's folder where the weights go, beside an old config.json
        (out / 'model.safetensors').unlink()
        (out / 'model.safetensors').mkdir()
        (out / 'model.safetensors' / 'mine.txt').write_text('keep')
    elif failure == 'config_is_a_folder':
        (out / 'config.json').unlink()
        (out / 'config.json').mkdir()
    elif failure in ('rename_fails', 'link_fails'):  # the commit's third move aside / second link in fails
        name = 'replace' if failure == 'rename_fails' else 'link'
        real, calls = getattr(os, name), []

        def flaky(src, dst, **kwargs):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(errno.EIO, 'Input/output error', str(dst))
            return real(src, dst, **kwargs)
        monkeypatch.setattr(os, name, flaky)
    else:
        def full(tensors, filename, *args, **kwargs):
            with open(filename, 'wb') as f:
                f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(shipping, 'save_file', full)
    before = tree(tmp_path)
    with pytest.raises(error) as info:
        strip(net, 0, out, overwrite=True)
    assert str(out) in str(info.value)
    assert tree(tmp_path) == before


@pytest.mark.skipif(sys.platform != 'linux', reason='tmpfs')
def test_disk_full_on_small_tmpfs(net, tmpfs):
    disk = tmpfs('1m')
    out = disk / 'out'
    strip(net, 2, out)  # ~0.1 MB: fits
    before = tree(disk)
    with pytest.raises(OutputWriteError, match='No space left on device') as info:
        strip(net, 0, out, overwrite=True)  # ~1.6 MB: does not
    assert info.value.errno == errno.ENOSPC
    assert tree(disk) == before
    assert load_stripped(out).branch == 2
    with pytest.raises(OutputWriteError, match='No space left on device'):
        strip(net, 0, disk / 'new')
    assert sorted(p.name for p in disk.iterdir()) == ['out']


def test_existing_folder_error_speaks_api(net, tmp_path):
    out = tmp_path / 'out'
    strip(net, 0, out)
    with pytest.raises(OutputExistsError, match=r'pass overwrite=True to replace') as info:
        strip(net, 0, out)
    assert '--force' not in str(info.value) and info.value.option == 'overwrite'
    assert 'pass --force to replace' in info.value.message(overwrite='--force')
    assert isinstance(info.value, FileExistsError)


def test_atomic_write_file(tmp_path, caplog, monkeypatch):
    path = tmp_path / 'exit.safetensors'
    atomic_write_file(path, lambda p: p.write_bytes(b'old'))
    user = tmp_path / f'{TMP_PREFIX}mine'
    user.mkdir()
    dead = _marker(tmp_path / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})

    def fails(p):
        p.write_bytes(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        with pytest.raises(OutputWriteError, match='No space left'):
            atomic_write_file(path, fails, overwrite=True)
    assert path.read_bytes() == b'old' and user.is_dir() and not dead.exists() and 'killed' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, user.name])
    with pytest.raises(OutputExistsError, match='overwrite=True'):
        atomic_write_file(path, lambda p: p.write_bytes(b'new'))  # overwrite is never the default
    with pytest.raises(OutputWriteError, match='produced no file'):
        atomic_write_file(tmp_path / 'nothing.png', lambda p: None)
    umask = os.umask(0o022)
    os.umask(umask)
    with monkeypatch.context() as m:
        m.setattr(atomic.os, 'umask', lambda *a: pytest.fail('the umask was set to read it'))
        assert atomic._umask() == umask  # read without changing it (Linux reports it in /proc/self/status)
    fresh = tmp_path / 'fresh.png'
    atomic_write_file(fresh, lambda p: p.write_bytes(b'new'))
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # a new file: the umask's mode, not mkstemp's 0600
    fresh.unlink()
    path.chmod(0o640)
    atomic_write_file(path, lambda p: p.write_bytes(b'new'), overwrite=True)
    assert path.read_bytes() == b'new' and path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    with pytest.raises(SourceInOutputError, match='is the input'):
        atomic_write_file(path, lambda p: p.write_bytes(b'x'), overwrite=True, sources=[path])
    assert path.read_bytes() == b'new' and sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, user.name])


def test_without_hard_links_the_last_step_still_never_replaces(tmp_path, net, monkeypatch):
    """On a filesystem without hard links the commit renames (RENAME_NOREPLACE, else check then rename)."""
    monkeypatch.setattr(os, 'link', _no_hard_links)
    out = strip(net, 2, tmp_path / 'out')
    strip(net, 1, out, overwrite=True)
    assert load_stripped(out).branch == 1 and sorted(os.listdir(out)) == EXPORT
    for noreplace in (atomic._renameat2(), None):
        monkeypatch.setattr(atomic, '_renameat2', lambda: noreplace)
        path = tmp_path / 'exit.safetensors'
        path.unlink(missing_ok=True)
        with appearing(path):
            with pytest.raises(OutputExistsError, match='appeared'):
                atomic_write_file(path, lambda p: p.write_bytes(b'new'))
        assert path.read_bytes() == MINE and not temps(tmp_path)


@pytest.mark.skipif(sys.platform != 'linux', reason='bytes file names')
def test_path_not_valid_utf8_works_fully(net, tmp_path):
    folder = tmp_path / os.fsdecode(b'runs-\xff\xfe')
    path = train_py_checkpoint(folder.parent / os.fsdecode(b'last-\xff.pth.tar'), net, ARCH, img_size=32)
    out = strip(path, 1, folder / 'export')
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert load_stripped(out).branch == 1
    with pytest.raises(OutputExistsError) as info:
        strip(path, 1, out)
    assert os.fsdecode(b'runs-\xff\xfe') in str(info.value)


# --- strip: a failed, refused or killed write leaves no model files --------------------------------------------
def test_failed_write_leaves_no_partial_files(trained, tmp_path, monkeypatch):
    net, x = trained
    real = shipping.save_file

    def disk_full(tensors, filename, *args, **kwargs):
        with open(filename, 'wb') as f:
            f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(shipping, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left'):
        strip(net, 0, tmp_path / 'new')
    assert not (tmp_path / 'new').exists()

    old = tmp_path / 'old'
    monkeypatch.setattr(shipping, 'save_file', real)
    strip(net, 0, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(shipping, 'save_file', disk_full)
    with pytest.raises(OSError, match='No space left'):
        strip(net, 2, old, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # the previous export is untouched
    assert torch.equal(eval_logits(load_stripped(old), x), branch_logits(net, x, 0))


def test_config_serialization_failure_leaves_nothing(tmp_path):
    base = timm.create_model('resnet18', num_classes=10, act_layer=nn.ReLU)  # a class: not JSON
    net = SilaNet(base, num_classes=10)
    with pytest.raises(ValueError, match='not serializable'):
        strip(net, 0, tmp_path / 'out')  # safetensors was already written in the temp folder
    assert not (tmp_path / 'out').exists()


KILLED_WRITER = r'''
import importlib, os, signal, sys, timm, timm_sila
S = importlib.import_module('timm_sila.ship.strip')
def killed(tensors, filename, *args, **kwargs):
    with open(filename, 'wb') as f:
        f.write(b'partial bytes')
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
S.save_file = killed
timm_sila.strip(timm.create_model('sila_resnet18', num_classes=10), 0, sys.argv[1])
'''


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
def test_killed_writer_leaves_no_model_files(trained, tmp_path):
    net, x = trained
    out = tmp_path / 'out'
    run = subprocess.run([sys.executable, '-c', KILLED_WRITER, str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == -9, run.stderr
    assert not (out / 'model.safetensors').exists() and not (out / 'config.json').exists()
    strip(net, 0, out)  # leftovers of the killed writer neither block nor survive a new export
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert torch.equal(eval_logits(load_stripped(out), x), branch_logits(net, x, 0))


def test_folder_flush_failing_after_the_commit_reports_the_new_files(tmp_path, net, monkeypatch, caplog):
    """Once the new files are in place, a failing flush of the folder is a warning saying so, not an error claiming
    the previous files are unchanged."""
    out = strip(net, 0, tmp_path / 'out')
    real = atomic._fsync

    def fsync(path, directory=False):
        if directory and Path(path) == out:
            raise OSError(errno.EIO, 'Input/output error')
        return real(path, directory)
    monkeypatch.setattr(atomic, '_fsync', fsync)
    with caplog.at_level('WARNING', logger='timm_sila.io.atomic'):
        strip(net, 1, out, overwrite=True)
    assert 'new files are in place' in caplog.text
    assert json.loads((out / 'config.json').read_text())['model_args'].get('sila_branch') == 1  # branch 0 had none
