"""Trust (issue 11): a file from a stranger chooses weights, never code, URLs, paths or downloads; every write is
whole or leaves the old state. Tables of hostile inputs, each tried on every reader; each case asserts the clear
error, that nothing was written (the tmp tree is unchanged) and that no connection was attempted."""
import argparse
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import timm
from safetensors.torch import load_file, save_file

import timm_sila
from timm_sila import CheckpointError, load_stripped, strip
from timm_sila.atomic import (
    MARKER_NAME, TMP_PREFIX, OutputBusyError, OutputExistsError, OutputWriteError,
    SourceInOutputError, atomic_output_dir, atomic_write_file)
from timm_sila.checkpoint import load_silanet, read_checkpoint
from timm_sila.config import SilaConfig, UnsafeFileError, sanitize_file_model_kwargs

ARCH = 'sila_test_resnet'  # timm's 0.4M-parameter test ResNet: taps layer3, layer1
EXPORT = ['README.md', 'config.json', 'model.safetensors']


# --- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails the test; hub / torch caches point into tmp_path, so a download would show
    in the tree snapshot too."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, f'test: network access to {address} refused')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket.socket, 'connect_ex', refuse)
    for var in ('HF_HOME', 'TORCH_HOME', 'XDG_CACHE_HOME'):
        monkeypatch.setenv(var, str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    yield attempts
    assert attempts == [], f'network access attempted: {attempts}'


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return timm.create_model(ARCH, num_classes=10).eval()


def snapshot(root: Path) -> dict:
    """Every path under root; files with size and modification time (folders' own mtimes are not compared)."""
    return {str(p.relative_to(root)): ('dir', p.is_symlink()) if p.is_dir() else
            (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob('*'))}


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def train_checkpoint(path: Path, net, **args):
    """A timm train.py checkpoint whose args carry `args` on top of train.py's own defaults."""
    defaults = dict(model=ARCH, num_classes=10, model_kwargs={}, img_size=None, input_size=None, in_chans=None,
                    gp=None, bn_momentum=None, bn_eps=None, mean=None, std=None, crop_pct=None, interpolation='',
                    pretrained=False, initial_checkpoint='', resume='', drop=0.0, drop_path=None)
    defaults.update(args)
    torch.save(dict(epoch=1, arch=ARCH, state_dict=net.state_dict(), args=argparse.Namespace(**defaults)), path)
    return path


def x_input():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# --- 1. a file never chooses what is fetched or written --------------------------------------------------------
def _hostile_kwargs(tmp: Path):
    """(key, value) a file may not set: loads / fetches / writes, unknown keys, wrong types."""
    return [
        ('pretrained', True),
        ('pretrained_cfg_overlay', {'url': 'http://127.0.0.1:9/x.pth'}),
        ('pretrained_cfg', {'hf_hub_id': 'evil/model', 'source': 'hf-hub'}),
        ('cache_dir', str(tmp / 'site')),
        ('checkpoint_path', str(tmp / 'elsewhere.pth')),
        ('hf_hub_id', 'evil/model'),
        ('pretrained_url', 'http://127.0.0.1:9/x.pth'),
        ('features_only', True),
        ('not_an_argument', 1),
        ('num_classes', True),  # a bool is not an int
        ('num_classes', '10'),
        ('drop_rate', float('nan')),
        ('sila_beta', float('inf')),
        ('sila_taps', {'layer3': 1}),
        ('sila_taps', [True, 1]),
        ('global_pool', '../../site-packages/x'),
        ('img_size', [32, [32]]),
    ]


HOSTILE_KEYS = [k for k, _ in _hostile_kwargs(Path('/'))]
HOSTILE_IDS = [f'{i}-{k}' for i, k in enumerate(HOSTILE_KEYS)]


@pytest.mark.parametrize('case', range(len(HOSTILE_KEYS)), ids=HOSTILE_IDS)
@pytest.mark.parametrize('reader', ['read_checkpoint', 'load_silanet', 'strip', 'load_stripped', 'timm_local_dir'])
def test_hostile_model_args_refused(net, tmp_path, reader, case):
    key, value = _hostile_kwargs(tmp_path)[case]
    (tmp_path / 'in').mkdir()
    (tmp_path / 'site').mkdir()
    if reader in ('read_checkpoint', 'load_silanet', 'strip'):
        path = train_checkpoint(tmp_path / 'in' / 'last.pth.tar', net, model_kwargs={key: value})
        call = {'read_checkpoint': lambda: read_checkpoint(path),
                'load_silanet': lambda: load_silanet(path),
                'strip': lambda: strip(path, 1, tmp_path / 'out')}[reader]
    else:
        export = strip(net, 1, tmp_path / 'in' / 'export')
        config = json.loads((export / 'config.json').read_text())
        config['model_args'][key] = value
        (export / 'config.json').write_text(json.dumps(config))
        if reader == 'load_stripped':
            call = lambda: load_stripped(export)  # noqa: E731
        else:
            if key in ('pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'checkpoint_path'):
                pytest.skip('timm.create_model itself refuses a second value of its own arguments (TypeError)')
            call = lambda: timm.create_model(f'local-dir:{export}', pretrained=True)  # noqa: E731
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeFileError, match=key) as info:
        call()
    assert info.value.key == key
    assert 'config.json' in str(info.value) or 'last.pth.tar' in str(info.value)  # names the file
    assert snapshot(tmp_path) == before  # nothing fetched into cache/site, no output folder


def test_explicit_argument_replaces_the_files(net, tmp_path):
    """An argument the caller passes is the caller's: the file's value for it is not read (escape hatch)."""
    path = train_checkpoint(tmp_path / 'last.pth.tar', net, model_kwargs={'drop_rate': 'high'})
    with pytest.raises(UnsafeFileError, match='drop_rate'):
        load_silanet(path)
    model = load_silanet(path, drop_rate=0.0)
    assert torch.equal(model(x_input()), net(x_input()))


def test_train_py_top_level_args_never_reach_create_model(net, tmp_path):
    """train.py's own --pretrained / --initial-checkpoint / --resume in args are not model kwargs: ignored."""
    path = train_checkpoint(tmp_path / 'last.pth.tar', net, pretrained=True,
                            initial_checkpoint=str(tmp_path / 'nope.pth'), resume=str(tmp_path / 'nope.pth'),
                            pretrained_cfg_overlay={'url': 'http://127.0.0.1:9/x'}, interpolation='')
    before = snapshot(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.model_kwargs == {'num_classes': 10} and ckpt.data_config == {}  # '' = the model's default
    model = load_silanet(ckpt)
    assert torch.equal(model(x_input()), net(x_input()))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('args,match', [
    (dict(mean=[float('nan'), 0.5, 0.5]), 'mean'),
    (dict(mean=[0.5, 0.5]), None),  # fine: 1-4 values
    (dict(std=[0.0, 0.5, 0.5]), 'std'),
    (dict(std='0.5'), 'std'),
    (dict(crop_pct=5.0), 'crop_pct'),
    (dict(crop_pct=0.0), 'crop_pct'),
    (dict(input_size=[3, -1, 32]), 'input_size'),
    (dict(input_size=[3, 32]), 'input_size'),
    (dict(input_size=[3, 10 ** 9, 32]), 'input_size'),
    (dict(img_size=True), 'img_size'),
    (dict(interpolation='http://127.0.0.1:9/x'), 'interpolation'),
    (dict(interpolation=None), None),
    (dict(model='hf-hub:evil/model'), 'not a timm model name'),
    (dict(model='local-dir:/etc'), 'not a timm model name'),
    (dict(model_kwargs=['pretrained']), 'model_kwargs'),
])
def test_hostile_train_args(net, tmp_path, args, match):
    path = train_checkpoint(tmp_path / 'last.pth.tar', net, **args)
    before = snapshot(tmp_path)
    if match is None:
        read_checkpoint(path)
        return
    for call in (lambda: read_checkpoint(path), lambda: strip(path, 0, tmp_path / 'out')):
        with pytest.raises(UnsafeFileError, match=match) as info:
            call()
        assert str(path) in str(info.value)
    assert snapshot(tmp_path) == before


HOSTILE_CONFIGS = [
    # (change to config.json, reader error or None when the hostile part is ignored)
    (dict(architecture='hf-hub:evil/model'), 'not a timm model name'),
    (dict(architecture='local-dir:/etc'), 'not a timm model name'),
    (dict(architecture='no_such_model'), 'not a registered timm model'),
    (dict(architecture=['resnet18']), 'not a timm model name'),
    (dict(model_args=['pretrained']), 'must be a mapping'),
    (dict(num_classes='ten', model_args={}), 'num_classes'),
    (dict(pretrained_cfg={'mean': [2.0, 0.5, 0.5]}), 'mean'),
    (dict(pretrained_cfg={'crop_pct': -1}), 'crop_pct'),
    (dict(pretrained_cfg={'interpolation': 'cubic; rm -rf'}), 'interpolation'),
    # pretrained_cfg's sources are ignored: the weights are the folder's model.safetensors
    (dict(pretrained_cfg={'url': 'http://127.0.0.1:9/x.pth', 'hf_hub_id': 'evil/model', 'source': 'hf-hub',
                          'file': '/etc/passwd', 'custom_load': 'hf', 'state_dict': 'x'}), None),
]


@pytest.mark.parametrize('change,match', HOSTILE_CONFIGS)
@pytest.mark.parametrize('reader', ['load_stripped', 'timm_local_dir'])
def test_hostile_config_json(net, tmp_path, change, match, reader):
    export = strip(net, 1, tmp_path / 'export')
    config = json.loads((export / 'config.json').read_text())
    for key, value in change.items():
        if key == 'pretrained_cfg':
            config[key].update(value)
        else:
            config[key] = value
    (export / 'config.json').write_text(json.dumps(config))
    if reader == 'load_stripped':
        load = lambda: load_stripped(export)  # noqa: E731
    elif 'architecture' in change or 'model_args' in change:
        pytest.skip('timm reads architecture and model_args itself before any timm_sila code runs')
    else:
        load = lambda: timm.create_model(f'local-dir:{export}', pretrained=True)  # noqa: E731
    before = snapshot(tmp_path)
    if match is None:
        model = load().eval()
        with torch.no_grad():
            net.branch = 1
            try:
                assert torch.equal(model(x_input()), net(x_input()))
            finally:
                net.branch = 0
        text = json.dumps(model.pretrained_cfg, default=str)
        assert not any(v in text for v in ('127.0.0.1', 'evil/model', '/etc/passwd', '"hf"', '"x"'))
    else:
        with pytest.raises(UnsafeFileError, match=match) as info:
            load()
        assert 'config.json' in str(info.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('content', [b'{not json', b'\xff\xfe\x00', b'[]', b'"text"', b''])
def test_malformed_config_json_names_the_file(net, tmp_path, content):
    export = strip(net, 0, tmp_path / 'export')
    (export / 'config.json').write_bytes(content)
    with pytest.raises(CheckpointError, match='config.json'):
        load_stripped(export)


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'header_only'])
def test_malformed_weights_name_the_file(net, tmp_path, damage):
    export = strip(net, 0, tmp_path / 'export')
    weights = export / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes({'truncated': data[:len(data) // 2], 'garbage': b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}',
                         'empty': b'', 'header_only': data[:8]}[damage])
    with pytest.raises(CheckpointError, match='model.safetensors'):
        load_stripped(export)


@pytest.mark.parametrize('dtype', [torch.int64, torch.int8, torch.bool, torch.uint8])
@pytest.mark.parametrize('reader', ['load_stripped', 'load_silanet'])
def test_integer_weights_refused_not_cast(net, tmp_path, dtype, reader):
    key = 'base.conv1.0.weight' if reader == 'load_silanet' else 'conv1.0.weight'
    if reader == 'load_stripped':
        export = strip(net, 0, tmp_path / 'export')
        tensors = load_file(str(export / 'model.safetensors'))
        assert tensors['bn1.num_batches_tracked'].dtype == torch.int64  # integer buffers load fine
        tensors[key] = tensors[key].to(dtype)
        save_file(tensors, str(export / 'model.safetensors'))
        call = lambda: load_stripped(export)  # noqa: E731
    else:
        state = {k: v.clone() for k, v in net.state_dict().items()}
        state[key] = state[key].to(dtype)
        path = tmp_path / 'state.safetensors'
        save_file(state, str(path))
        call = lambda: load_silanet(path, model=ARCH)  # noqa: E731
    with pytest.raises(CheckpointError, match=rf'dtype kind.*{key}'):
        call()


def test_float_buffer_where_integer_expected_refused(net, tmp_path):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state['base.bn1.num_batches_tracked'] = state['base.bn1.num_batches_tracked'].float()
    torch.save(state, tmp_path / 'sd.pth')
    with pytest.raises(CheckpointError, match='num_batches_tracked'):
        load_silanet(tmp_path / 'sd.pth', model=ARCH)


def test_half_precision_weights_load(net, tmp_path):
    """fp16 weights are the same kind (floating point): loaded, as torch does."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / 'sd.pth')
    model = load_silanet(tmp_path / 'sd.pth', model=ARCH)
    assert torch.allclose(model(x_input()), net(x_input()), atol=0.05)


def test_sila_config_table():
    assert SilaConfig().to_kwargs() == dict(sila_sets=3, sila_beta=0.1, sila_decay=0.5, sila_taps=None,
                                            sila_branch=0, sila_head='conv3x3', sila_stripped=False)
    assert SilaConfig.from_kwargs(dict(sila_sets=4, sila_taps=('a', 'b', 2))).taps == ['a', 'b', 2]
    for bad in (dict(sets=True), dict(sets=2.0), dict(beta=float('nan')), dict(decay=-0.1), dict(branch=3),
                dict(branch=False), dict(taps=['a']), dict(taps='layer3'), dict(head='../x'), dict(stripped=1)):
        with pytest.raises(ValueError):
            SilaConfig(**bad)
    with pytest.raises(ValueError, match='Unknown SilaNet arguments'):
        SilaConfig.from_kwargs(dict(sila_gamma=1))
    assert sanitize_file_model_kwargs({'img_size': (32, 32), 'drop_rate': None}, 'f') == {'img_size': [32, 32]}


# --- 2. writes never destroy data --------------------------------------------------------------------------------
@pytest.mark.parametrize('where', ['inside', 'is_out_dir', 'is_weights_file', 'nested', 'symlinked_out_dir'])
def test_source_inside_output_refused(net, tmp_path, where):
    out = tmp_path / 'out'
    strip(net, 2, out)  # a previous export
    if where == 'inside':
        source = train_checkpoint(out / 'last.pth.tar', net)
    elif where == 'nested':
        (out / 'runs').mkdir()
        source = train_checkpoint(out / 'runs' / 'last.pth.tar', net)
    elif where == 'is_weights_file':
        save_file(net.state_dict(), str(out / 'full.safetensors'))
        os.replace(out / 'full.safetensors', out / 'model.safetensors')
        source = out / 'model.safetensors'
    elif where == 'is_out_dir':
        source = train_checkpoint(tmp_path / 'last.pth.tar', net)
        out = source
    else:
        train_checkpoint(out / 'last.pth.tar', net)
        (tmp_path / 'link').symlink_to(out)
        source, out = tmp_path / 'link' / 'last.pth.tar', out
    before = snapshot(tmp_path)
    with pytest.raises(SourceInOutputError, match='is or contains the input'):
        strip(source, 0, out, overwrite=True, model=ARCH)
    assert snapshot(tmp_path) == before
    if where == 'inside':
        from timm_sila.cli import main
        assert main(['strip', str(source), '--out', str(out), '--force']) == 2
        assert snapshot(tmp_path) == before


def _marker(folder: Path, info) -> Path:
    folder.mkdir()
    (folder / MARKER_NAME).write_text(info if isinstance(info, str) else json.dumps(info))
    (folder / 'model.safetensors').write_bytes(b'partial')
    return folder


def test_temp_folders_of_others_survive_abandoned_ones_are_removed(net, tmp_path, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    user = out / f'{TMP_PREFIX}my-notes'  # the user's own folder, sharing the prefix
    user.mkdir()
    (user / 'notes.txt').write_text('keep me')
    foreign = _marker(out / f'{TMP_PREFIX}foreign', '{"writer": "someone-else"}')
    unreadable = _marker(out / f'{TMP_PREFIX}garbage', 'not json')
    live = _marker(out / f'{TMP_PREFIX}live', {'writer': 'timm-sila', 'pid': os.getpid()})
    dead = _marker(out / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})
    link = out / f'{TMP_PREFIX}link'
    link.symlink_to(dead.parent.parent)  # a symlink with the prefix is never followed nor removed
    holder = os.open(live / MARKER_NAME, os.O_RDONLY)  # its writer is alive: it holds the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with caplog.at_level('WARNING', logger='timm_sila.atomic'):
            strip(net, 0, out, overwrite=True)
    finally:
        os.close(holder)
    assert not dead.exists()
    assert 'Removed 1 temporary folder' in caplog.text and dead.name in caplog.text
    assert (user / 'notes.txt').read_text() == 'keep me'
    assert foreign.is_dir() and unreadable.is_dir() and live.is_dir() and link.is_symlink()
    assert {'config.json', 'model.safetensors'} <= {p.name for p in out.iterdir()}


def test_abandoned_temp_folder_does_not_make_a_folder_non_empty(net, tmp_path, caplog):
    out = tmp_path / 'out'
    out.mkdir()
    _marker(out / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})
    with caplog.at_level('WARNING', logger='timm_sila.atomic'):
        strip(net, 0, out)  # no overwrite needed: a killed writer's leftovers are not the user's files
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert 'killed' in caplog.text


KILLED_MID_COMMIT = r'''
import os, signal, sys, timm, timm_sila
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    real(src, dst)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
timm_sila.strip(timm.create_model('sila_test_resnet', num_classes=10), 0, sys.argv[1], overwrite=True)
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='SIGKILL')
@pytest.mark.parametrize('renames', [1, 2, 3])  # killed after: config aside / weights aside / new weights in
def test_kill_mid_commit_restores_previous_export(net, tmp_path, renames, caplog):
    out = tmp_path / 'out'
    strip(net, 2, out)
    before = contents(out)
    run = subprocess.run([sys.executable, '-c', KILLED_MID_COMMIT, str(out), str(renames)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -9, run.stderr
    assert not (out / 'config.json').exists()  # killed mid-commit: no config beside foreign weights
    with caplog.at_level('WARNING', logger='timm_sila.atomic'):
        with pytest.raises(OutputExistsError):
            strip(net, 1, out)  # the next writer puts the previous export back first
    assert 'restored the previous' in caplog.text
    assert sorted(p.name for p in out.iterdir()) == EXPORT and contents(out) == before
    assert load_stripped(out).branch == 2


CONCURRENT_WRITER = r'''
import importlib, os, sys, time, timm, timm_sila
S = importlib.import_module('timm_sila.shipping')
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
except timm_sila.atomic.OutputError as e:
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
    model = load_stripped(out)
    assert model.branch == 1


def test_locked_folder_refused_at_once(net, tmp_path):
    out = tmp_path / 'out'
    strip(net, 2, out)
    before = snapshot(tmp_path)
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(OutputBusyError, match='another process'):
            strip(net, 0, out, overwrite=True)
        assert time.monotonic() - started < 5
    finally:
        os.close(holder)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('failure', ['weights_is_a_folder', 'config_is_a_folder', 'rename_fails', 'disk_full'])
def test_failed_overwrite_keeps_previous_export(net, tmp_path, monkeypatch, failure):
    out = tmp_path / 'out'
    strip(net, 2, out)
    if failure == 'weights_is_a_folder':  # the user's folder where the weights go, beside an old config.json
        (out / 'model.safetensors').unlink()
        (out / 'model.safetensors').mkdir()
        (out / 'model.safetensors' / 'mine.txt').write_text('keep')
    elif failure == 'config_is_a_folder':
        (out / 'config.json').unlink()
        (out / 'config.json').mkdir()
    elif failure == 'rename_fails':  # the commit's third rename (new weights in) fails: roll back
        import timm_sila.atomic as atomic
        real, calls = os.replace, []

        def flaky(src, dst):
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(errno.EIO, 'Input/output error', str(dst))
            real(src, dst)
        monkeypatch.setattr(atomic.os, 'replace', flaky)
    else:
        import timm_sila.shipping as shipping

        def full(tensors, filename, *args, **kwargs):
            with open(filename, 'wb') as f:
                f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"partial')
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(shipping, 'save_file', full)
    before = snapshot(tmp_path)
    with pytest.raises(OutputWriteError) as info:
        strip(net, 0, out, overwrite=True)
    assert str(out) in str(info.value)
    assert snapshot(tmp_path) == before


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        run = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


@pytest.mark.skipif(sys.platform != 'linux', reason='tmpfs')
def test_disk_full_on_small_tmpfs(net, tmp_path):
    disk = tmp_path / 'disk'
    if not _mount_tmpfs(disk, '1m'):
        pytest.skip('cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)')
    try:
        out = disk / 'out'
        strip(net, 2, out)  # ~0.1 MB: fits
        before = snapshot(disk)
        with pytest.raises(OutputWriteError, match='No space left on device') as info:
            strip(net, 0, out, overwrite=True)  # ~1.6 MB: does not
        assert info.value.errno == errno.ENOSPC
        assert snapshot(disk) == before
        assert load_stripped(out).branch == 2
        with pytest.raises(OutputWriteError, match='No space left on device'):
            strip(net, 0, disk / 'new')
        assert sorted(p.name for p in disk.iterdir()) == ['out']
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True, timeout=30)


def test_existing_folder_error_speaks_api(net, tmp_path):
    out = tmp_path / 'out'
    strip(net, 0, out)
    with pytest.raises(OutputExistsError, match=r'pass overwrite=True to replace') as info:
        strip(net, 0, out)
    assert '--force' not in str(info.value) and info.value.option == 'overwrite'
    assert 'pass --force to replace' in info.value.message('--force')
    assert isinstance(info.value, FileExistsError)


# --- the single-file writer (EarlyExit.save) ------------------------------------------------------------------------
def test_atomic_write_file(tmp_path, caplog):
    path = tmp_path / 'exit.safetensors'
    atomic_write_file(path, lambda p: p.write_bytes(b'old'))
    user = tmp_path / f'{TMP_PREFIX}mine'
    user.mkdir()
    dead = _marker(tmp_path / f'{TMP_PREFIX}dead', {'writer': 'timm-sila', 'pid': 2 ** 22 + 1})

    def fails(p):
        p.write_bytes(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with caplog.at_level('WARNING', logger='timm_sila.atomic'):
        with pytest.raises(OutputWriteError, match='No space left'):
            atomic_write_file(path, fails)
    assert path.read_bytes() == b'old' and user.is_dir() and not dead.exists() and 'killed' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, user.name])
    with pytest.raises(OutputExistsError, match='overwrite=True'):
        atomic_write_file(path, lambda p: p.write_bytes(b'new'), overwrite=False)
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_file(path, lambda p: p.write_bytes(b'new'))
    assert path.read_bytes() == b'new' and path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_output_dir_writer_keeps_other_files(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'README.md').write_text('mine')
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / 'config.json').write_text('{}')
        (tmp / 'a.bin').write_bytes(b'a')
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'a.bin', 'config.json']
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / 'new') as tmp:
            (tmp / 'config.json').write_text('{}')
            raise RuntimeError('writer failed')
    assert not (tmp_path / 'new').exists()


@pytest.mark.skipif(sys.platform != 'linux', reason='bytes file names')
def test_path_not_valid_utf8_works_fully(net, tmp_path):
    folder = tmp_path / os.fsdecode(b'runs-\xff\xfe')
    path = train_checkpoint(folder.parent / os.fsdecode(b'last-\xff.pth.tar'), net)
    out = strip(path, 1, folder / 'export')
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    assert load_stripped(out).branch == 1
    with pytest.raises(OutputExistsError) as info:
        strip(path, 1, out)
    assert os.fsdecode(b'runs-\xff\xfe') in str(info.value)
