"""EarlyExit: per-sample routing is exact, samples really leave the batch, and it saves and loads whole.

Thresholds and temperatures are finite numbers of any numeric type (Python, numpy, 0-d or 1-d tensors); a hostile
EarlyExit file is one CheckpointError naming it, with no network access and nothing written."""
import json
import math

import numpy as np
import pytest
import torch

import timm
import timm_sila.exits.early_exit
from safetensors.torch import load_file, save_file

from conftest import build_sila
from timm_sila.io.trust import CheckpointError
from timm_sila.exits.early_exit import EarlyExit

NAN, INF = float('nan'), float('inf')


@pytest.fixture(scope='module')
def model():
    return build_sila('resnet18')[0].eval()


@pytest.fixture(scope='module')
def small():
    return build_sila('test_resnet', 2)[0].eval()


@pytest.fixture(scope='module')
def x():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _expected(model, x, exit_set, temperatures=None):
    ref = model.forward_branches(x)
    t = temperatures or [1.0] * model.sets
    return torch.stack([ref[int(s)][i] / t[int(s)] for i, s in enumerate(exit_set)])


@torch.no_grad()
def test_no_exit_is_the_base_model(model, x):
    result = EarlyExit(model, thresholds=None, input_size=(3, 32, 32))(x)
    assert result.exit_set.tolist() == [0] * len(x)
    assert torch.allclose(result.logits, model.base(x), atol=1e-5)
    assert result.compute == pytest.approx(1.0)


@torch.no_grad()
def test_everyone_exits_at_the_shallowest_tap(model, x):
    ee = EarlyExit(model, thresholds=0.0, input_size=(3, 32, 32))
    result = ee(x)
    assert result.exit_set.tolist() == [model.sets - 1] * len(x)
    seg = ee.segment_macs(x)
    assert result.compute == pytest.approx(seg[0] / sum(seg))
    torch.testing.assert_close(result.logits, model.forward_branch(x, model.sets - 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('policy', ['confidence', 'entropy'])
@torch.no_grad()
def test_mixed_exits_keep_order_and_only_survivors_run_later_stages(model, x, policy):
    temps = [1.0, 0.05, 0.05]  # sharpen the heads so some samples clear the threshold
    scores = {k: model.forward_branch(x, k) / temps[k] for k in (1, 2)}
    if policy == 'confidence':
        conf2 = scores[2].softmax(-1).amax(-1)
        threshold = float(conf2.median())
    else:
        p = scores[2].softmax(-1)
        ent2 = -(p * p.clamp_min(1e-30).log()).sum(-1)
        threshold = float(ent2.median())
    ee = EarlyExit(model, thresholds=[threshold, threshold], policy=policy, temperatures=temps,
                   input_size=(3, 32, 32))
    seen = []
    handle = model.base.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        result = ee(x)
    finally:
        handle.remove()
    n_left = int((result.exit_set == 0).sum())
    assert 0 < int((result.exit_set == 2).sum()) < len(x)
    assert seen[-1] == n_left, 'layer4 must run only on samples still in flight'
    torch.testing.assert_close(result.logits, _expected(model, x, result.exit_set, temps), rtol=1e-4, atol=1e-4)
    seg = ee.segment_macs(x)
    n2 = int((result.exit_set == 2).sum())
    n1 = int((result.exit_set == 1).sum())
    expected = (seg[0] * len(x) + seg[1] * (len(x) - n2) + seg[2] * (len(x) - n2 - n1)) / (sum(seg) * len(x))
    assert result.compute == pytest.approx(expected)


@pytest.mark.parametrize('arch,kwargs', [('vit_tiny_patch16_224', dict(img_size=32)), ('test_vit', {})])
def test_refuses_token_models_at_construction(arch, kwargs):
    model = timm.create_model(f'sila_{arch}', num_classes=10, **kwargs).eval()
    with pytest.raises(ValueError, match='NCHW'):
        EarlyExit(model, thresholds=0.5)  # no forward needed: the check runs when the EarlyExit is built


def test_construction_check_keeps_train_mode_and_batch_norm_statistics():
    model = build_sila('test_resnet')[0].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    EarlyExit(model, thresholds=0.5, input_size=(3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@torch.no_grad()
def test_empty_batch_returns_empty_outputs(model):
    result = EarlyExit(model, thresholds=0.5, input_size=(3, 32, 32))(torch.zeros(0, 3, 32, 32))
    assert result.logits.shape == (0, 10) and result.exit_set.shape == (0,)
    assert result.exit_set.dtype == torch.long and math.isnan(result.compute)


@pytest.mark.parametrize('kwargs,match', [
    (dict(policy='margin'), 'policy'), (dict(thresholds=[0.5]), 'thresholds'),
    (dict(temperatures=[1.0, 0.0, 1.0]), 'temperatures'),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyExit(model, **kwargs)


def test_needs_full_eval_model(model):
    stripped = timm.create_model('sila_resnet18', num_classes=10, sila_branch=1, sila_stripped=True)
    with pytest.raises(ValueError, match='not stripped'):
        EarlyExit(stripped)
    train_model = timm.create_model('sila_resnet18', num_classes=10).train()
    with pytest.raises(ValueError, match='eval'):
        EarlyExit(train_model)(torch.randn(2, 3, 32, 32))


@torch.no_grad()
def test_save_and_load_round_trip(model, x, tmp_path):
    ee = EarlyExit(model, thresholds=[0.3, 0.6], policy='confidence', temperatures=[1.0, 1.5, 2.0])
    path = tmp_path / 'exit.safetensors'
    ee.save(path)
    loaded = EarlyExit.load(path)
    assert loaded.config() == ee.config()
    a, b = ee(x), loaded(x)
    assert torch.equal(a.exit_set, b.exit_set) and torch.allclose(a.logits, b.logits)
    assert b.compute == a.compute and 0 < b.compute <= 1
    assert [p.name for p in tmp_path.iterdir()] == ['exit.safetensors']


def test_failed_save_keeps_the_previous_file_whole(model, tmp_path, monkeypatch):
    """EarlyExit.save goes through the shared atomic writer: a disk-full error midway leaves the old file."""
    import errno

    path = tmp_path / 'exit.safetensors'
    EarlyExit(model, thresholds=0.3, input_size=(3, 32, 32)).save(path)
    old = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device', filename)

    monkeypatch.setattr(timm_sila.exits.early_exit, 'save_file', disk_full)  # the writer EarlyExit.save calls
    with pytest.raises(OSError, match='space'):
        EarlyExit(model, thresholds=0.9, input_size=(3, 32, 32)).save(path, overwrite=True)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ['exit.safetensors']
    assert EarlyExit.load(path).thresholds == [0.3, 0.3]


# --- thresholds and temperatures: finite numbers of any numeric type --------------------------------------------
BAD_EXIT_VALUES = {
    'threshold nan': dict(thresholds=NAN),
    'threshold inf': dict(thresholds=INF),
    'threshold -inf': dict(thresholds=-INF),
    'one threshold nan': dict(thresholds=[0.5, NAN]),
    'numpy nan': dict(thresholds=np.float32('nan')),
    '0-d tensor inf': dict(thresholds=torch.tensor(INF)),
    'threshold string': dict(thresholds='0.5'),
    'threshold bool': dict(thresholds=True),
    'threshold an integer beyond float': dict(thresholds=10 ** 400),
    'temperature an integer beyond float': dict(temperatures=[1.0, 10 ** 400, 1.0]),
    'threshold None item': dict(thresholds=[0.5, None]),
    'threshold count': dict(thresholds=[0.5, 0.5, 0.5]),
    'temperature nan': dict(temperatures=[1.0, NAN, 1.0]),
    'temperature inf': dict(temperatures=[1.0, INF, 1.0]),
    'temperature tensor inf': dict(temperatures=torch.tensor([1.0, 1.0, INF])),
    'temperature negative': dict(temperatures=[1.0, 1.0, -1.0]),
    'temperature zero numpy': dict(temperatures=np.array([1.0, 0.0, 1.0])),
}


@pytest.mark.parametrize('kwargs', BAD_EXIT_VALUES.values(), ids=BAD_EXIT_VALUES.keys())
def test_bad_thresholds_and_temperatures_are_refused(small, kwargs):
    with pytest.raises(ValueError, match='thresholds|temperatures'):
        EarlyExit(small, input_size=(3, 32, 32), **kwargs)


def test_set_thresholds_refuses_nan(small):
    ee = EarlyExit(small, thresholds=0.5, input_size=(3, 32, 32))
    with pytest.raises(ValueError, match='thresholds'):
        ee.set_thresholds(NAN)
    assert ee.thresholds == [0.5, 0.5]


GOOD_THRESHOLDS = {
    'numpy float32': (np.float32(0.5), [0.5, 0.5]),
    'numpy float64': (np.float64(0.25), [0.25, 0.25]),
    '0-d tensor': (torch.tensor(0.75), [0.75, 0.75]),
    '0-d numpy array': (np.array(0.5), [0.5, 0.5]),
    'int': (1, [1.0, 1.0]),
    'mixed list': ([np.float32(0.25), torch.tensor(0.75)], [0.25, 0.75]),
    '1-d tensor': (torch.tensor([0.25, 0.75]), [0.25, 0.75]),
    '1-d numpy': (np.array([0.25, 0.75]), [0.25, 0.75]),
}


@pytest.mark.parametrize('value,expected', GOOD_THRESHOLDS.values(), ids=GOOD_THRESHOLDS.keys())
def test_numpy_and_tensor_thresholds_are_accepted(small, value, expected):
    ee = EarlyExit(small, thresholds=value, temperatures=np.array([1.0, 2.0, 0.5]), input_size=(3, 32, 32))
    assert ee.thresholds == expected and all(type(t) is float for t in ee.thresholds + ee.temperatures)
    assert json.loads(json.dumps(ee.config()))['thresholds'] == expected


@pytest.mark.parametrize('policy', ['confidence', 'entropy'])
@torch.no_grad()
def test_no_thresholds_is_finite_and_never_exits(small, policy):
    ee = EarlyExit(small, thresholds=None, policy=policy, input_size=(3, 32, 32))
    assert all(math.isfinite(t) for t in ee.thresholds)
    x = torch.randn(3, 3, 32, 32)
    assert ee(x).exit_set.tolist() == [0, 0, 0]
    sharp = EarlyExit(small, thresholds=None, policy=policy, temperatures=[1.0, 1e-3, 1e-3], input_size=(3, 32, 32))
    assert sharp(x).exit_set.tolist() == [0, 0, 0], 'even a one-hot softmax must not clear the "never" threshold'


# --- hostile EarlyExit files: one CheckpointError naming the file, no network, nothing written ------------------
@pytest.fixture(scope='module')
def saved(small, tmp_path_factory):
    path = tmp_path_factory.mktemp('valid') / 'exit.safetensors'
    EarlyExit(small, thresholds=[0.4, 0.6], temperatures=[1.0, 1.5, 2.0]).save(path)
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        meta = json.loads(f.metadata()['timm_sila'])
    return load_file(str(path)), meta, path


def _args(key, value):
    return lambda m: m['model_args'].update({key: value})


def _early(key, value):
    return lambda m: m['early_exit'].update({key: value})


HOSTILE = {  # name: (change to the metadata dict | raw metadata text | None = no metadata, change to the tensors)
    'pretrained=True': (_args('pretrained', True), None),
    'pretrained_cfg_overlay url': (_args('pretrained_cfg_overlay', {'url': 'http://127.0.0.1:9/evil.pth'}), None),
    'pretrained_cfg hub id': (_args('pretrained_cfg', {'hf_hub_id': 'evil/model'}), None),
    'cache_dir': (_args('cache_dir', '{site}'), None),
    'checkpoint_path': (_args('checkpoint_path', '/etc/passwd'), None),
    'unknown model argument': (_args('some_future_flag', 1), None),
    'sila_taps as a path': (_args('sila_taps', ['../../etc/passwd', 'layer1']), None),
    'sila_sets a string': (_args('sila_sets', '3'), None),
    'model_args a list': (lambda m: m.update(model_args=['pretrained']), None),
    'hub architecture': (lambda m: m.update(arch='hf-hub:evil/model'), None),
    'unknown architecture': (lambda m: m.update(arch='not_a_model'), None),
    'num_classes a string': (lambda m: m.update(num_classes='2'), None),
    'num_classes bool': (lambda m: m.update(num_classes=True), None),
    'early_exit missing': (lambda m: m.pop('early_exit'), None),
    'thresholds NaN': ('{"arch": "test_resnet", "num_classes": 2, "model_args": {}, "early_exit": {"policy": '
                       '"confidence", "thresholds": [NaN, 0.5], "temperatures": [1, 1, 1]}}', None),
    'thresholds Infinity': (_early('thresholds', [INF, INF]), None),
    'thresholds an integer beyond float': (_early('thresholds', [10 ** 400, 0.5]), None),
    'thresholds strings': (_early('thresholds', ['0.5', '0.5']), None),
    'temperatures negative': (_early('temperatures', [1.0, -1.0, 1.0]), None),
    'temperatures wrong count': (_early('temperatures', [1.0]), None),
    'policy unknown': (_early('policy', 'margin'), None),
    'malformed JSON': ('{"arch": "test_resnet", ', None),
    'metadata a list': ('[]', None),
    'no metadata': (None, None),
    'integer weights': (None, 'int'),
    'missing tensor': (None, 'drop'),
    'wrong shape': (None, 'shape'),
}


def _write_hostile(path, saved, meta_change, tensor_change, site):
    tensors, meta, _ = saved
    tensors = dict(tensors)
    metadata = None
    if meta_change is None and tensor_change is None:
        metadata = {'other': '1'}
    elif isinstance(meta_change, str):
        metadata = {'timm_sila': meta_change}
    else:
        meta = json.loads(json.dumps(meta))
        if meta_change is not None:
            meta_change(meta)
        metadata = {'timm_sila': json.dumps(meta).replace('{site}', str(site))}
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 4)
    if tensor_change == 'int':
        tensors[key] = tensors[key].round().to(torch.int64)
    elif tensor_change == 'drop':
        del tensors[key]
    elif tensor_change == 'shape':
        tensors[key] = tensors[key][:1].contiguous()
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize('meta_change,tensor_change', HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_early_exit_files_are_one_clear_error(saved, meta_change, tensor_change, tmp_path, no_network,
                                                      monkeypatch):
    home = tmp_path / 'home'
    home.mkdir()
    for var in ('HF_HOME', 'TORCH_HOME', 'XDG_CACHE_HOME'):
        monkeypatch.setenv(var, str(home))
    site = tmp_path / 'site'
    path = tmp_path / 'hostile.safetensors'
    _write_hostile(path, saved, meta_change, tensor_change, site)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError) as info:
        EarlyExit.load(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)
    assert no_network == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not site.exists()
    assert list(home.iterdir()) == []


def test_truncated_early_exit_file(saved, tmp_path, no_network):
    path = tmp_path / 'cut.safetensors'
    data = saved[2].read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.safetensors'):
        EarlyExit.load(path)
    assert no_network == []


def test_valid_file_still_loads_without_network(saved, no_network):
    loaded = EarlyExit.load(saved[2])
    assert loaded.thresholds == [0.4, 0.6] and loaded.temperatures == [1.0, 1.5, 2.0]
    assert no_network == []


def test_save_refuses_what_load_would_refuse(tmp_path):
    """A model built with a create_model argument off the file allow-list (timm records features_only=False in
    its _model_args) cannot be saved: the file would not load."""
    model = timm.create_model('sila_test_resnet', num_classes=2, features_only=False).eval()
    with pytest.raises(ValueError, match="features_only=False, which an EarlyExit file may not carry"):
        EarlyExit(model).save(tmp_path / 'exit.safetensors')
    assert list(tmp_path.iterdir()) == []
