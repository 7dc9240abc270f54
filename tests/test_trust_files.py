"""Trust (issue 11): a file from a stranger chooses weights, never code, URLs, paths or downloads (the writers'
rules are tested in test_atomic.py). Tables of hostile inputs, each tried on every reader; each case asserts the
clear error, that nothing was written (the tmp tree is unchanged) and that no connection was attempted."""
import argparse
import errno
import json
import socket
from pathlib import Path

import pytest
import torch

import timm
from safetensors.torch import load_file, save_file

import timm_sila
from timm_sila import CheckpointError, load_stripped, strip
from timm_sila.io.checkpoint import load_silanet, read_checkpoint
from timm_sila.config import SilaConfig
from timm_sila.io.trust import UnsafeFileError, sanitize_file_model_kwargs

ARCH = 'sila_test_resnet'  # timm's 0.4M-parameter test ResNet: taps layer3, layer1


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
