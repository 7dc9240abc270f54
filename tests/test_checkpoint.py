"""Checkpoints read as timm reads them, and what a file claims checked against the weights it carries.

Layouts: every one timm's `load_checkpoint` reads (weights under 'state_dict' or 'model' or the file itself, EMA
under 'state_dict_ema' or 'model_ema', with or without `args`), compared with timm's own function. Arguments that
disagree with the file's own tensors are refused before anything is built for real, naming the argument; whatever
timm raises while building from file values is one CheckpointError; compressed storages cannot expand a small file
into gigabytes. An argument the caller passes replaces the file's; train.py's own arguments (pretrained, resume,
...) never reach create_model; tensors of another dtype kind than the model's are refused, not cast.
"""
import argparse
import io
import json
import time
import zipfile

import pytest
import torch

import timm
from safetensors.torch import load_file, save_file

from conftest import early_exit_file, snapshot, train_py_args, train_py_checkpoint, x_input

from timm_sila import load_stripped, strip
from timm_sila.io.checkpoint import build_checked, load_silanet, read_checkpoint
from timm_sila.io.trust import CheckpointError, UnsafeFileError
from timm_sila.exits.early_exit import EarlyExit
from timm_sila_cli import main

ARCH = 'sila_test_resnet'  # timm's 0.4M-parameter test ResNet: default taps layer3, layer1
TAPS = ['layer2', 'layer1']  # not the default: a reader that skips the file's args builds other heads

pytestmark = pytest.mark.usefixtures('no_network')


@pytest.fixture(scope='module')
def nets():
    """(model, EMA stand-in) with non-default taps, and an input batch."""
    torch.manual_seed(0)
    net = timm.create_model(ARCH, num_classes=10, sila_taps=TAPS).eval()
    ema = timm.create_model(ARCH, num_classes=10, sila_taps=TAPS).eval()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    return net, ema, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def train_args(**fields):
    """timm train.py's args for a SilaNet with TAPS (train.py's defaults, `fields` on top)."""
    return train_py_args(**dict(dict(model=ARCH, num_classes=10, model_kwargs={'sila_taps': TAPS}), **fields))


def deit_args(**fields):
    """What DeiT's main.py saves as `args` (ConvNeXt's is alike): an int input_size, nb_classes, no num_classes."""
    args = dict(batch_size=64, epochs=300, model=ARCH, input_size=32, drop=0.0, drop_path=0.1, model_ema=True,
                model_ema_decay=0.99996, model_ema_force_cpu=False, opt='adamw', opt_eps=1e-8, momentum=0.9,
                weight_decay=0.05, sched='cosine', lr=5e-4, smoothing=0.1, train_interpolation='bicubic',
                repeated_aug=True, reprob=0.25, mixup=0.8, cutmix=1.0, teacher_model='regnety_160',
                distillation_type='none', finetune='', data_path='/datasets01/imagenet_full_size/061417/',
                data_set='IMNET', output_dir='', device='cuda', seed=0, resume='', eval_crop_ratio=0.875,
                dist_url='env://', nb_classes=10, distributed=True)
    args.update(fields)
    return argparse.Namespace(**args)


# (layout name, the saved object from (state_dict, ema state_dict, args), has EMA, records the model)
LAYOUTS = {
    'bare state_dict': (lambda sd, ema, args: sd, False, False),
    'state_dict': (lambda sd, ema, args: {'state_dict': sd}, False, False),
    'state_dict + args (train.py)': (lambda sd, ema, args: {'epoch': 3, 'arch': ARCH, 'state_dict': sd,
                                                             'args': args}, False, True),
    'state_dict + state_dict_ema + args': (lambda sd, ema, args: {'state_dict': sd, 'state_dict_ema': ema,
                                                                   'args': args}, True, True),
    'state_dict + model_ema': (lambda sd, ema, args: {'state_dict': sd, 'model_ema': ema, 'args': args}, True, True),
    'model': (lambda sd, ema, args: {'model': sd}, False, False),
    'model + args': (lambda sd, ema, args: {'model': sd, 'args': args}, False, True),
    'model + model_ema + args (DeiT / ConvNeXt)': (lambda sd, ema, args: {'model': sd, 'model_ema': ema,
                                                                           'optimizer': {}, 'epoch': 3,
                                                                           'args': args}, True, True),
    'model + model_ema + args as a dict': (lambda sd, ema, args: {'model': sd, 'model_ema': ema, 'args': vars(args)},
                                           True, True),
    'state_dict_ema before model_ema': (lambda sd, ema, args: {'state_dict': sd, 'state_dict_ema': ema,
                                                                'model_ema': sd, 'args': args}, True, True),
    'EMA None, model_ema next': (lambda sd, ema, args: {'state_dict': sd, 'state_dict_ema': None, 'model_ema': ema,
                                                        'args': args}, True, True),
    'DDP and compiled prefixes': (lambda sd, ema, args: {'model': {f'module.{k}': v for k, v in sd.items()},
                                                         'model_ema': {f'_orig_mod.{k}': v for k, v in ema.items()},
                                                         'args': args}, True, True),
}


@pytest.mark.parametrize('ema', [False, True], ids=['model', 'ema'])
@pytest.mark.parametrize('layout', LAYOUTS, ids=list(LAYOUTS))
def test_every_layout_reads_as_timm_load_checkpoint(nets, tmp_path, layout, ema):
    make, has_ema, records_model = LAYOUTS[layout]
    net, ema_net, x = nets
    path = tmp_path / 'ckpt.pth'
    torch.save(make(net.state_dict(), ema_net.state_dict(), train_args()), path)
    # the model as a user of timm gets it: built by hand, weights by timm's own load_checkpoint
    reference = timm.create_model(ARCH, num_classes=10, sila_taps=TAPS).eval()
    timm.models.load_checkpoint(reference, str(path), use_ema=ema)
    kwargs = {} if records_model else dict(model=ARCH, taps=TAPS)
    if ema and not has_ema:  # timm falls back to the model's weights; timm-sila says there are none
        with pytest.raises(CheckpointError, match='no state_dict_ema or model_ema entry'):
            load_silanet(path, ema=True, **kwargs)
        return
    loaded = load_silanet(path, ema=ema, **kwargs)
    assert loaded.taps == TAPS  # the file's args were read in this layout
    assert torch.equal(loaded(x), reference(x))
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_safetensors_state_dict_reads_as_timm(nets, tmp_path):
    net, _, x = nets
    path = tmp_path / 'weights.safetensors'
    save_file(net.state_dict(), str(path))
    reference = timm.create_model(ARCH, num_classes=10, sila_taps=TAPS).eval()
    timm.models.load_checkpoint(reference, str(path))
    assert torch.equal(load_silanet(path, model=ARCH, taps=TAPS)(x), reference(x))


@pytest.mark.parametrize('layout', ['state_dict', 'model + args', 'bare state_dict'])
def test_ema_missing_names_the_keys_looked_for_truthfully(nets, tmp_path, layout, capfd):
    net, _, _ = nets
    path = tmp_path / 'ckpt.pth'
    torch.save(LAYOUTS[layout][0](net.state_dict(), None, train_args()), path)
    with pytest.raises(CheckpointError) as info:
        load_silanet(path, model=ARCH, taps=TAPS, ema=True)
    message = str(info.value)
    assert 'no state_dict_ema or model_ema entry' in message and str(path) in message
    held = {'state_dict': 'keys are state_dict', 'model + args': 'keys are args, model',
            'bare state_dict': 'it is a bare state_dict'}[layout]
    assert held in message, message
    # the plain-model path of `timm-sila eval` says the same
    plain = tmp_path / 'plain.pth'
    torch.save({'model': timm.create_model('test_resnet', num_classes=10).state_dict()}, plain)
    (tmp_path / 'data' / 'test' / 'c0').mkdir(parents=True)
    assert main(['eval', '--model', 'test_resnet', '--checkpoint', str(plain), '--data-dir', str(tmp_path / 'data'),
                 '--ema', '--workers', '0', '--device', 'cpu']) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no state_dict_ema or model_ema entry' in err[0] and 'keys are model' in err[0], err


def test_deit_style_args_are_read_for_what_they_mean(tmp_path):
    """DeiT's args: an int input_size (the side DeiT builds its model at), nb_classes; the rest is ignored."""
    torch.manual_seed(0)
    net = timm.create_model('sila_test_vit', num_classes=10, img_size=64).eval()
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': net.state_dict(), 'model_ema': net.state_dict(), 'optimizer': {}, 'epoch': 299,
                'args': deit_args(model='sila_test_vit', input_size=64)}, path)
    ckpt = read_checkpoint(path)
    assert ckpt.model_kwargs == {'num_classes': 10} and ckpt.origins == {'num_classes': 'args.nb_classes'}
    assert ckpt.data_config == {'img_size': 64} and ckpt.img_size == 64
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(load_silanet(path)(x), net(x))
    export = strip(path, 1, tmp_path / 'branch1', ema=True)
    assert json.loads((export / 'config.json').read_text())['pretrained_cfg']['input_size'] == [3, 64, 64]


@pytest.fixture(scope='module')
def vit64(tmp_path_factory):
    """A train.py checkpoint of a ViT trained at 64 px the usual way: --model-kwargs img_size=64 --img-size 64."""
    torch.manual_seed(0)
    net = timm.create_model('sila_test_vit', num_classes=10, img_size=64).eval()
    path = tmp_path_factory.mktemp('vit') / 'last.pth.tar'
    train_py_checkpoint(path, net, 'sila_test_vit', model_kwargs={'img_size': 64}, img_size=64)
    return net, path


def test_vit_img_size_in_model_kwargs_loads_without_repeating_it(vit64, tmp_path, capfd):
    net, path = vit64
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(load_silanet(path)(x), net(x))
    assert torch.equal(load_silanet(path, img_size=64)(x), net(x))
    with pytest.raises(CheckpointError, match=r'base\.pos_embed \(1, 17, 64\) vs \(1, 5, 64\)'):  # 32 was built
        load_silanet(path, img_size=32)
    assert main(['strip', str(path), '--branch', '1', '--out', str(tmp_path / 'out')]) == 0


# --- the caller's arguments, and train.py's arguments that are not the model's ----------------------------------
def test_explicit_argument_replaces_the_files(net, tmp_path):
    """An argument the caller passes is the caller's: the file's value for it is not read (escape hatch)."""
    path = train_py_checkpoint(tmp_path / 'last.pth.tar', net, ARCH, model_kwargs={'drop_rate': 'high'})
    with pytest.raises(UnsafeFileError, match='drop_rate'):
        load_silanet(path)
    model = load_silanet(path, drop_rate=0.0)
    assert torch.equal(model(x_input()), net(x_input()))


def test_train_py_top_level_args_never_reach_create_model(net, tmp_path):
    """train.py's own --pretrained / --initial-checkpoint / --resume in args are not model kwargs: ignored."""
    path = train_py_checkpoint(tmp_path / 'last.pth.tar', net, ARCH, pretrained=True,
                               initial_checkpoint=str(tmp_path / 'nope.pth'), resume=str(tmp_path / 'nope.pth'),
                               pretrained_cfg_overlay={'url': 'http://127.0.0.1:9/x'}, interpolation='')
    before = snapshot(tmp_path)
    ckpt = read_checkpoint(path)
    assert ckpt.model_kwargs == {'num_classes': 10} and ckpt.data_config == {}  # '' = the model's default
    model = load_silanet(ckpt)
    assert torch.equal(model(x_input()), net(x_input()))
    assert snapshot(tmp_path) == before


# --- what a file claims, against the weights it carries ----------------------------------------------------------
def _train_file(tmp, net, arch=ARCH, **args):
    return train_py_checkpoint(tmp / 'last.pth.tar', net, arch, **dict(dict(model_kwargs={'sila_taps': TAPS}), **args))


def _config_file(tmp, net, branch=1, **model_args):
    export = strip(net, branch, tmp / 'export')
    config = json.loads((export / 'config.json').read_text())
    config['model_args'].update(model_args)
    (export / 'config.json').write_text(json.dumps(config))
    return export


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return timm.create_model('sila_test_vit', num_classes=10, img_size=32).eval()


# (id, build the file, read it, fragments of the one error line)
DISAGREEMENTS = {
    'train.py num_classes': (lambda t, n, v: _train_file(t, n, num_classes=200_000), load_silanet,
                             ['args.num_classes = 200000', 'base.fc.weight', 'hold 10 classes']),
    'train.py in_chans': (lambda t, n, v: _train_file(t, n, model_kwargs={'sila_taps': TAPS, 'in_chans': 1}),
                          load_silanet, ['args.model_kwargs.in_chans = 1', 'take 3 input channels']),
    'train.py sila_sets': (lambda t, n, v: _train_file(t, n, model_kwargs={'sila_sets': 4}),
                           load_silanet, ['args.model_kwargs.sila_sets = 4', '2 auxiliary heads']),
    'train.py ViT depth': (lambda t, n, v: _train_file(t, v, 'sila_test_vit',
                                                       model_kwargs={'img_size': 32, 'depth': 40}),
                           load_silanet, ['args.model_kwargs.depth = 40', 'base.blocks']),
    'given num_classes': (lambda t, n, v: _train_file(t, n), lambda p: load_silanet(p, num_classes=200_000),
                          ['num_classes (given) = 200000', 'hold 10 classes']),
    'config.json num_classes': (lambda t, n, v: _config_file(t, n, num_classes=200_000), load_stripped,
                                ['model_args.num_classes = 200000', 'config.json', 'hold 10 classes']),
    'config.json ViT depth': (lambda t, n, v: _config_file(t, v, 0, depth=40), load_stripped,
                              ['model_args.depth = 40', 'blocks', 'config.json']),
    'early-exit num_classes': (lambda t, n, v: early_exit_file(t / 'exit.safetensors', n, num_classes=200_000),
                               EarlyExit.load, ['num_classes = 200000', 'hold 10 classes']),
    'early-exit in_chans': (lambda t, n, v: early_exit_file(t / 'exit.safetensors', n, in_chans=7), EarlyExit.load,
                            ['model_args.in_chans = 7', 'take 3 input channels']),
}


@pytest.mark.parametrize('case', DISAGREEMENTS, ids=list(DISAGREEMENTS))
def test_arguments_that_disagree_with_the_weights_are_refused_before_building(nets, vit, tmp_path, case):
    make, read, fragments = DISAGREEMENTS[case]
    path = make(tmp_path, nets[0], vit)
    before = sorted(p for p in tmp_path.rglob('*'))
    start = time.process_time()  # CPU time: the work the file causes, whatever else runs on the machine
    with pytest.raises(CheckpointError) as info:
        read(path)
    elapsed = time.process_time() - start
    message = str(info.value)
    assert '\n' not in message and 'so the model was not built' in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert elapsed < (3.0 if 'depth' in case else 1.0), elapsed  # a meta build: no weights initialised
    assert sorted(p for p in tmp_path.rglob('*')) == before


def test_plain_timm_checkpoint_is_checked_like_a_silanet(tmp_path, capfd):
    """`eval --model <plain timm arch>`: the same checks (no cast of integer tensors, arguments named)."""
    state = timm.create_model('test_resnet', num_classes=10).state_dict()
    (tmp_path / 'data' / 'test' / 'c0').mkdir(parents=True)
    eval_cmd = ['eval', '--model', 'test_resnet', '--data-dir', str(tmp_path / 'data'), '--workers', '0',
                '--device', 'cpu', '--checkpoint']
    ints = dict(state, **{'conv1.0.weight': state['conv1.0.weight'].round().to(torch.int64)})
    torch.save(ints, tmp_path / 'ints.pth')
    assert main(eval_cmd + [str(tmp_path / 'ints.pth')]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'dtype kind' in err[0] and 'conv1.0.weight' in err[0], err
    torch.save({'state_dict': state, 'args': train_args(model='test_resnet', model_kwargs={})}, tmp_path / 'ok.pth')
    assert main(eval_cmd + [str(tmp_path / 'ok.pth'), '--num-classes', '200000']) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--num-classes = 200000 but the classifier weights (fc.weight) hold 10' in err[0], err


# --- one guarded build: whatever timm raises on file values is one CheckpointError ---------------------------------
BAD_BUILDS = {
    'act_layer': ({'act_layer': 'nope'}, 'KeyError'),
    'norm_layer': ({'norm_layer': 'nope'}, 'nope'),
    'global_pool': ({'global_pool': 'nope'}, 'AssertionError'),
    'window_size': ({'window_size': 7}, 'TypeError'),  # an argument ResNet does not take
}


@pytest.mark.parametrize('reader', ['train.py args', 'config.json', 'early-exit metadata'])
@pytest.mark.parametrize('case', BAD_BUILDS, ids=list(BAD_BUILDS))
def test_timm_errors_on_file_values_are_one_checkpoint_error(nets, tmp_path, reader, case):
    kwargs, fragment = BAD_BUILDS[case]
    net = nets[0]
    if reader == 'train.py args':
        path, read = _train_file(tmp_path, net, model_kwargs=dict(kwargs, sila_taps=TAPS)), load_silanet
    elif reader == 'config.json':
        path, read = _config_file(tmp_path, net, **kwargs), load_stripped
    else:
        path, read = early_exit_file(tmp_path / 'exit.safetensors', net, **kwargs), EarlyExit.load
    key, value = next(iter(kwargs.items()))
    with pytest.raises(CheckpointError) as info:
        read(path)
    message = str(info.value)
    assert '\n' not in message and fragment in message and f'{key}={value!r}' in message, message
    assert str(path) in message


# --- tensors of another dtype kind are refused, not cast ---------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.int64, torch.int8, torch.bool, torch.uint8])
@pytest.mark.parametrize('reader', ['load_stripped', 'load_silanet', 'timm_local_dir'])
def test_integer_weights_refused_not_cast(net, stripped_copy, tmp_path, dtype, reader):
    """Every reader refuses them: load_stripped, load_silanet, and timm.create_model('local-dir:...') of a branch-1
    folder, which timm_sila's registry loads through the same checked loader."""
    key = 'conv1.0.weight' if reader == 'load_stripped' else 'base.conv1.0.weight'
    if reader in ('load_stripped', 'timm_local_dir'):
        export = stripped_copy(0 if reader == 'load_stripped' else 1, tmp_path / 'export')
        tensors = load_file(str(export / 'model.safetensors'))
        num_batches = 'bn1.num_batches_tracked' if reader == 'load_stripped' else 'base.bn1.num_batches_tracked'
        assert tensors[num_batches].dtype == torch.int64  # integer buffers load fine
        tensors[key] = tensors[key].to(dtype)
        save_file(tensors, str(export / 'model.safetensors'))
        call = ((lambda: load_stripped(export)) if reader == 'load_stripped' else  # noqa: E731
                (lambda: timm.create_model(f'local-dir:{export}', pretrained=True)))
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


# --- compressed storages -------------------------------------------------------------------------------------------
def _recompressed(src, dst, level=6):
    """dst: the torch zip checkpoint src with every entry deflate-compressed (torch.load reads it as well)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_DEFLATED, compresslevel=level) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


def test_compressed_storage_expanding_far_beyond_the_file_is_refused_before_loading(tmp_path, monkeypatch):
    torch.save({'state_dict': {'w': torch.zeros(16 << 20)}}, tmp_path / 'stored.pth')  # 64 MiB of zeros
    path = _recompressed(tmp_path / 'stored.pth', tmp_path / 'deflated.pth')
    assert path.stat().st_size < 1 << 20
    loads = []
    monkeypatch.setattr(torch, 'load', lambda *a, **k: loads.append(a))  # records a call; must not happen
    with pytest.raises(CheckpointError, match=r'compressed entries expand to 67,1\d\d,\d\d\d bytes.*4x'):
        read_checkpoint(path)
    assert loads == []


def test_compressed_checkpoint_within_the_bound_loads(nets, tmp_path):
    """Weights compress little (random floats: ratio ~1.1), so a deflated real checkpoint still loads."""
    net, _, x = nets
    torch.save({'state_dict': net.state_dict(), 'args': train_args()}, tmp_path / 'stored.pth')
    path = _recompressed(tmp_path / 'stored.pth', tmp_path / 'deflated.pth', level=9)
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    assert torch.equal(load_silanet(path)(x), net(x))


def test_corrupt_zip_directory_is_one_checkpoint_error(nets, tmp_path):
    buffer = io.BytesIO()
    torch.save(nets[0].state_dict(), buffer)
    (tmp_path / 'cut.pth').write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        read_checkpoint(tmp_path / 'cut.pth')


def test_build_checked_falls_back_to_a_real_build_only_within_bounds(tmp_path, monkeypatch):
    """Where the meta device cannot build a model, values outside FILE_LIMITS are refused instead of built."""
    import timm_sila.io.checkpoint as checkpoint
    real_create = checkpoint.create_with_img_size

    def no_meta(name, img_size=None, /, **kwargs):
        if torch.empty(0).device.type == 'meta':
            raise RuntimeError('cannot build on meta')
        return real_create(name, img_size, **kwargs)
    monkeypatch.setattr(checkpoint, 'create_with_img_size', no_meta)
    state = timm.create_model('test_resnet', num_classes=10).state_dict()
    model = build_checked('test_resnet', {'num_classes': 10}, state, 'file.pth')
    assert torch.equal(model.state_dict()['fc.weight'], state['fc.weight'])
    with pytest.raises(CheckpointError, match=r'meta device.*num_classes=1000000.*262144'):
        build_checked('test_resnet', {'num_classes': 1_000_000}, state, 'file.pth')


def test_unsafe_values_still_refused_before_any_build(nets, tmp_path):
    path = _train_file(tmp_path, nets[0], model_kwargs={'pretrained_cfg_overlay': {'url': 'http://127.0.0.1:9'}})
    with pytest.raises(UnsafeFileError, match='pretrained_cfg_overlay'):
        load_silanet(path)
