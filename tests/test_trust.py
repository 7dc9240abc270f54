"""The file-trust rules: a file from a stranger chooses weights, never code, URLs, paths, downloads or unbounded work.

Every reader (train.py checkpoints, a strip folder's config.json, EarlyExit files; in the library and through timm's
`local-dir:`) takes create_model arguments from a file only from the allow-list `FILE_MODEL_KWARGS`, within the
bounds of `FILE_LIMITS`, and reads JSON within bounds of size and depth. The hostile tables try each case on every
reader: each asserts the clear error, that nothing was written (the tmp tree is unchanged) and that no connection was
attempted. The writers' rules are tested in test_atomic.py, what a file claims against its own weights in
test_checkpoint.py.

The hostile files of the bounds table also run through the real CLI in ONE fresh Python process (imports are paid
once): per case it records the exit status, what reached stdout/stderr, the CPU and wall time of the command, the
process's peak RSS after it, any connection attempted and whether anything under the work folder changed. Each case
must answer with exit status 2 and one line, within 5 s (CPU and wall, imports excluded), with a peak RSS under 1 GB
(and at most 256 MB above the RSS after imports), writing and fetching nothing.
"""
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

import timm

from conftest import (build_sila, early_exit_file, image_folder, run_in_fresh_process, snapshot, train_py_checkpoint,
                      x_input)
from timm_sila import load_stripped, strip
from timm_sila.io.checkpoint import load_silanet, read_checkpoint
from timm_sila.io.trust import (FILE_LIMITS, FILE_MODEL_KWARGS, CheckpointError, UnsafeFileError, bound_violation,
    parse_file_json, sanitize_file_data_config, sanitize_file_model_kwargs)

ARCH = 'sila_test_resnet'  # timm's 0.4M-parameter test ResNet: taps layer3, layer1

pytestmark = pytest.mark.usefixtures('no_network')


# --- the allow-list: a file never chooses what is fetched or written ------------------------------------------
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
def test_hostile_model_args_refused(net, stripped_copy, tmp_path, reader, case):
    key, value = _hostile_kwargs(tmp_path)[case]
    (tmp_path / 'in').mkdir()
    (tmp_path / 'site').mkdir()
    if reader in ('read_checkpoint', 'load_silanet', 'strip'):
        path = train_py_checkpoint(tmp_path / 'in' / 'last.pth.tar', net, ARCH, model_kwargs={key: value})
        call = {'read_checkpoint': lambda: read_checkpoint(path),
                'load_silanet': lambda: load_silanet(path),
                'strip': lambda: strip(path, 1, tmp_path / 'out')}[reader]
    else:
        export = stripped_copy(1, tmp_path / 'in' / 'export')
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
    path = train_py_checkpoint(tmp_path / 'last.pth.tar', net, ARCH, **args)
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
def test_hostile_config_json(net, stripped_copy, tmp_path, change, match, reader):
    export = stripped_copy(1, tmp_path / 'export')
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


# --- the bounds table: every size a file may set ----------------------------------------------------------------
def test_every_size_a_file_may_set_has_a_bound_with_a_reason():
    sizes = {'num_classes', 'in_chans', 'img_size', 'patch_size', 'window_size', 'output_stride', 'head_hidden_size',
             'embed_dim', 'embed_dims', 'dims', 'depth', 'depths', 'num_heads', 'layers', 'stem_width',
             'reg_tokens', 'mlp_ratio', 'width_multiplier', 'channel_multiplier', 'depth_multiplier',
             'sila_sets', 'sila_taps', 'sila_branch'}
    assert sizes <= set(FILE_MODEL_KWARGS) and sizes <= set(FILE_LIMITS)
    assert {'crop_pct', 'json_bytes', 'json_depth', 'zip_expansion'} <= set(FILE_LIMITS)
    for key, bound in FILE_LIMITS.items():
        assert bound.lo <= bound.hi and len(bound.why) > 20, key


def test_every_registered_pretrained_cfg_is_within_the_bounds():
    """The bounds leave room for every model timm registers: its pretrained cfgs pass as a file's values."""
    from timm.models import _registry
    checked = 0
    for name, cfg in _registry._model_pretrained_cfgs.items():
        cfg = cfg.to_dict()
        sanitize_file_model_kwargs({'num_classes': cfg.get('num_classes')}, name)
        for size_key in ('input_size', 'test_input_size'):
            sanitize_file_data_config({k: cfg.get(k) for k in ('crop_pct', 'mean', 'std')}
                                      | {'input_size': cfg.get(size_key)}, name)
        checked += 1
    assert checked > 3000


BEYOND = [  # (key, value) just outside each bound, (key, value) at it
    ('num_classes', 262_145, 262_144), ('in_chans', 1025, 1024), ('img_size', [64, 4097], [4096, 4096]),
    ('depth', 129, 128), ('depths', [3, 4, 250], [3, 4, 128, 121]), ('layers', [129], [128]),
    ('embed_dim', 8193, 8192), ('num_heads', 257, 256), ('mlp_ratio', 16.5, 16.0), ('patch_size', 65, 64),
    ('window_size', [7, 65], [64, 64]), ('output_stride', 4, 8), ('depth_multiplier', 8.1, 8.0),
    ('sila_sets', 33, 32), ('sila_taps', ['layer1'] * 32, ['layer1'] * 31), ('reg_tokens', 33, 32),
]


@pytest.mark.parametrize('key,beyond,at', BEYOND, ids=[b[0] for b in BEYOND])
def test_bounds_refuse_just_beyond_and_accept_at(key, beyond, at):
    with pytest.raises(UnsafeFileError) as info:
        sanitize_file_model_kwargs({key: beyond}, 'file.json')
    message = str(info.value)
    assert info.value.key == key and 'file.json' in message and key in message and FILE_LIMITS[key].why in message
    assert bound_violation(key, at) is None
    assert sanitize_file_model_kwargs({key: at}, 'file.json') == {key: at}


@pytest.mark.parametrize('config,fragment', [
    ({'crop_pct': 0.002}, 'below the bound >= 0.5'),
    ({'crop_pct': 1e-9}, 'below the bound >= 0.5'),
    ({'crop_pct': 2.5}, 'above the bound 2'),
    ({'input_size': [3, 65536, 65536]}, 'a side: 65536 is above the bound 4096'),
    ({'input_size': [100_000_000, 32, 32]}, 'its channels: 100000000 is above the bound 1024'),
    ({'img_size': 5000}, 'above the bound 4096'),
])
def test_data_config_bounds(config, fragment):
    with pytest.raises(UnsafeFileError, match='file.json sets the data config value') as info:
        sanitize_file_data_config(config, 'file.json')
    assert fragment in str(info.value)


def test_crop_pct_of_real_models_accepted():
    assert sanitize_file_data_config({'crop_pct': 0.875}, 'f') == {'crop_pct': 0.875}
    assert sanitize_file_data_config({'crop_pct': 1.15}, 'f') == {'crop_pct': 1.15}


# --- the JSON reader ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('text,fragment', [
    ('[' * 33 + ']' * 33, 'nests 33 levels deep, above the bound of 32'),
    ('[' * 200_000 + ']' * 200_000, 'nests 200000 levels deep'),
    ('{"a": ' * 100_000 + '1' + '}' * 100_000, 'nests 100000 levels deep'),
    ('"' + 'x' * (1 << 20) + '"', 'larger than 1,048,576 bytes'),
    (b'{"a": "\xff"}', 'not UTF-8 text'),
    ('{"a": NaN', 'not valid JSON'),
])
def test_json_bounds(text, fragment):
    with pytest.raises(CheckpointError, match='Cannot read the file') as info:
        parse_file_json(text, 'the file')
    assert fragment in str(info.value) and '\n' not in str(info.value)


def test_json_within_bounds_reads_as_json():
    text = json.dumps({'a': [[['[[{{ not a bracket']]] * 3, 'b': '\\"]'})
    nested = '[' * 32 + ']' * 32
    assert parse_file_json(text, 'f') == json.loads(text)
    assert parse_file_json(nested, 'f') == json.loads(nested)


# --- hostile files through the command line, in one fresh process: one line, bounded work, nothing written -----
RSS_BOUND_MB = 1024  # peak RSS of the process, imports included (torch + timm: about 0.75 GB on CPU builds)
GROWTH_BOUND_MB = 256  # what one case may add to the RSS after imports (the bound on a build whose imports are larger)
TIME_BOUND_S = 5.0


def _deflated_storage(path: Path, mib: int = 512) -> Path:
    """A torch zip checkpoint of a few MB whose one storage, deflate-compressed, inflates to `mib` MiB:
    {'state_dict': {'w': float32[mib * 2**18]}}. Written from a small torch.save whose pickled sizes are patched."""
    numel = mib << 18
    buffer = io.BytesIO()
    torch.save({'state_dict': {'w': torch.zeros(233)}}, buffer)  # 233 pickles as BININT1 b'K\xe9'
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as zin, zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith('/data.pkl'):
                assert data.count(b'K\xe9') == 2  # the storage's numel and the tensor's size
                zout.writestr(info.filename, data.replace(b'K\xe9', b'J' + numel.to_bytes(4, 'little')))
            elif '/data/' in info.filename:
                with zout.open(info.filename, 'w', force_zip64=True) as f:
                    chunk = bytes(16 << 20)
                    for _ in range(numel * 4 // len(chunk)):
                        f.write(chunk)
            else:
                zout.writestr(info.filename, data)
    return path


def _integer_weights(path: Path) -> Path:
    """A plain test_resnet state_dict with one weight stored as integers."""
    state = timm.create_model('test_resnet', num_classes=10).state_dict()
    state['conv1.0.weight'] = state['conv1.0.weight'].round().to(torch.int64)
    torch.save(state, path)
    return path


def _fifo(path: Path) -> Path:
    """A named pipe where a weights file is expected: opening it to read would wait for a writer forever."""
    os.mkfifo(path)
    return path


def _folder(root: Path, net, name: str, config_text=None, **model_args) -> Path:
    folder = strip(net, 0, root / name)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(model_args)
    (folder / 'config.json').write_text(config_text or json.dumps(config))
    return folder


DEEP = '[' * 200_000 + ']' * 200_000

# (id, how the file is made in the work folder w, the command, fragments of the one error line)
EVAL = ['eval', '--model', 'sila_test_resnet', '--data-dir', '{w}/data', '--workers', '0', '--device', 'cpu',
        '--checkpoint']
CASES = [
    ('num_classes 200,000 in train.py args (strip)',
     lambda w, r, v: train_py_checkpoint(w / 'nc.pth.tar', r, ARCH, args_as_dict=True, num_classes=200_000),
     ['strip', '{w}/nc.pth.tar', '--branch', '0', '--out', '{w}/out'], ['args.num_classes = 200000', 'hold 10']),
    ('num_classes 1,000,000 in train.py args (eval)',
     lambda w, r, v: train_py_checkpoint(w / 'nc1m.pth.tar', r, ARCH, args_as_dict=True, num_classes=1_000_000),
     EVAL + ['{w}/nc1m.pth.tar'], ['num_classes=1000000', '262144']),
    ('num_classes 50,000,000 in train.py args (export)',
     lambda w, r, v: train_py_checkpoint(w / 'nc50m.pth.tar', r, ARCH, args_as_dict=True, num_classes=50_000_000),
     ['export', '{w}/nc50m.pth.tar', '--branch', '1', '--format', 'pt2', '--out', '{w}/out.pt2'],
     ['num_classes=50000000', '262144']),
    ('ViT model_kwargs.depth 1000 (bench)',
     lambda w, r, v: train_py_checkpoint(w / 'vit.pth.tar', v, 'sila_test_vit', args_as_dict=True,
                                         model_kwargs={'img_size': 32, 'depth': 1000}),
     ['bench', '{w}/vit.pth.tar', '--repeats', '1', '--warmup', '0'], ['depth=1000', '128']),
    ('input_size 3x65536x65536 (eval)',
     lambda w, r, v: train_py_checkpoint(w / 'big_input.pth.tar', r, ARCH, args_as_dict=True,
                                         input_size=[3, 65536, 65536]),
     EVAL + ['{w}/big_input.pth.tar'], ['input_size=[3, 65536, 65536]', '4096']),
    ('crop_pct 0.002 (eval)',
     lambda w, r, v: train_py_checkpoint(w / 'crop.pth.tar', r, ARCH, args_as_dict=True, crop_pct=0.002),
     EVAL + ['{w}/crop.pth.tar'], ['crop_pct=0.002', '0.5']),
    ('crop_pct 1e-9 (eval)',
     lambda w, r, v: train_py_checkpoint(w / 'crop9.pth.tar', r, ARCH, args_as_dict=True, crop_pct=1e-9),
     EVAL + ['{w}/crop9.pth.tar'], ['crop_pct=1e-09', '0.5']),
    ('deflated 512 MiB storage (strip)', lambda w, r, v: _deflated_storage(w / 'deflated.pth'),
     ['strip', '{w}/deflated.pth', '--branch', '0', '--model', 'sila_test_resnet', '--out', '{w}/out'],
     ['deflated.pth', 'compressed entries expand', '4x']),
    ('plain checkpoint with integer tensors (eval)',
     lambda w, r, v: _integer_weights(w / 'ints.pth'),
     ['eval', '--model', 'test_resnet', '--num-classes', '10', '--data-dir', '{w}/data', '--workers', '0',
      '--device', 'cpu', '--checkpoint', '{w}/ints.pth'],
     ['ints.pth', '1 tensors of another dtype kind, refused rather than cast', 'conv1.0.weight torch.int64']),
    ('config.json act_layer "nope" (eval)', lambda w, r, v: _folder(w, r, 'act', act_layer='nope'),
     ['eval', '--model', 'local-dir:{w}/act', '--data-dir', '{w}/data', '--workers', '0', '--device', 'cpu'],
     ['config.json', "act_layer='nope'", 'KeyError']),
    ('config.json 200,000 levels deep (export)', lambda w, r, v: _folder(w, r, 'deep', config_text=DEEP),
     ['export', '{w}/deep', '--format', 'pt2', '--out', '{w}/out.pt2'], ['config.json', 'nests 200000 levels']),
    ('config.json of 1 MB escaped quotes in an unclosed string (export)',
     lambda w, r, v: _folder(w, r, 'quotes', config_text='"' + '\\"' * 500_000),
     ['export', '{w}/quotes', '--format', 'pt2', '--out', '{w}/out.pt2'], ['config.json', 'not valid JSON (Unterminated string']),
    ('early-exit in_chans 1e8', lambda w, r, v: early_exit_file(w / 'ee_chans.safetensors', r, in_chans=10 ** 8),
     'ee_chans.safetensors', ['in_chans=100000000', '1024']),
    ('early-exit output_stride 7', lambda w, r, v: early_exit_file(w / 'ee_os.safetensors', r, output_stride=7),
     'ee_os.safetensors', ['output_stride=7', '(8, 16, 32)']),
    ('early-exit global_pool "nope"', lambda w, r, v: early_exit_file(w / 'ee_gp.safetensors', r, global_pool='nope'),
     'ee_gp.safetensors', ["global_pool='nope'", 'AssertionError']),
    ('a FIFO named like a checkpoint (strip)', lambda w, r, v: _fifo(w / 'fifo.pth.tar'),
     ['strip', '{w}/fifo.pth.tar', '--branch', '0', '--model', 'sila_test_resnet', '--out', '{w}/out'],
     ['fifo.pth.tar', 'not a regular file']),
    ('a FIFO named like an early-exit file', lambda w, r, v: _fifo(w / 'fifo.safetensors'),
     'fifo.safetensors', ['fifo.safetensors', 'not a regular file']),
    ('early-exit metadata 200,000 levels deep', lambda w, r, v: early_exit_file(w / 'ee_deep.safetensors', r, DEEP),
     'ee_deep.safetensors', ['ee_deep.safetensors', 'nests 200000 levels']),
]


@pytest.fixture(scope='module')
def hostile_runs(tmp_path_factory):
    """Every case of CASES run in one fresh Python process; {case id: what the runner recorded}."""
    work = tmp_path_factory.mktemp('hostile')
    image_folder(work / 'data', classes=1, n=1)
    resnet = build_sila('test_resnet')[0].eval()
    torch.manual_seed(0)
    vit = timm.create_model('sila_test_vit', num_classes=10, img_size=32).eval()
    cases = []
    for case_id, make, command, _ in CASES:
        make(work, resnet, vit)
        if isinstance(command, str):
            cases.append(dict(id=case_id, kind='early_exit', path=str(work / command)))
        else:
            cases.append(dict(id=case_id, kind='cli', argv=[a.replace('{w}', str(work)) for a in command]))
    cache = dict(HF_HOME=str(work / 'cache'), TORCH_HOME=str(work / 'cache'), XDG_CACHE_HOME=str(work / 'cache'))
    return run_in_fresh_process(cases, work, tmp_path_factory.mktemp('runner'), env=cache), work


@pytest.mark.slow  # the module set-up (`hostile_runs`) runs every case in one fresh process
@pytest.mark.parametrize('case', [c[0] for c in CASES])
def test_hostile_file_is_one_line_bounded_and_harmless(hostile_runs, case):
    results, work = hostile_runs
    fragments = next(c[3] for c in CASES if c[0] == case)
    r = results[case]
    lines = r['stderr'].strip().splitlines()
    assert r['rc'] == 2 and len(lines) == 1 and 'error:' in lines[0], r['stderr'][-2000:]
    for fragment in fragments:
        assert fragment.replace('{w}', str(work)) in lines[0], (fragment, lines[0])
    assert r['stdout'] == ''
    assert r['cpu'] < TIME_BOUND_S and r['wall'] < TIME_BOUND_S, f'{r["cpu"]:.1f} s of CPU, {r["wall"]:.1f} s wall'
    assert r['rss_mb'] - r['baseline_mb'] < GROWTH_BOUND_MB, f'peak RSS {r["rss_mb"]:.0f} MB'
    assert r['rss_mb'] < RSS_BOUND_MB, f'peak RSS {r["rss_mb"]:.0f} MB, imports included'
    assert r['connects'] == [] and not r['changed']
    assert not (work / 'cache').exists() and not (work / 'out').exists() and not (work / 'out.pt2').exists()
