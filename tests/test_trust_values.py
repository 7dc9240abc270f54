"""Trust (issue 11 §3-4), table-driven: non-finite hyper-parameters, thresholds and temperatures are refused, numpy
and tensor numbers accepted, empty batches give empty outputs, hostile EarlyExit files are one clear error with no
network access and nothing written, and exit-curve's bad values are one line with exit status 2."""
import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import timm

from timm_sila import SilaLoss, SilaNet, sila_cross_entropy, sila_log_probs, sila_set_weights
from timm_sila_cli import main
from timm_sila.io.trust import CheckpointError
from timm_sila.exits.early_exit import EarlyExit
from timm_sila.exits.curve import exit_curve
from timm_sila.loss.logits import wrap_sila_logits

NAN, INF = float('nan'), float('inf')


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return timm.create_model('sila_test_resnet', num_classes=2).eval()


# --- 1. non-finite hyper-parameters: ValueError from every entry point -------------------------------------------
def _sila_logits():
    return wrap_sila_logits(torch.zeros(2, 30), 10, 0.1, 0.5)


BAD_HPARAMS = {
    'SilaLoss beta nan': lambda: SilaLoss(10, beta=NAN),
    'SilaLoss beta inf': lambda: SilaLoss(10, beta=INF),
    'SilaLoss decay nan': lambda: SilaLoss(10, decay=NAN),
    'SilaLoss decay -inf': lambda: SilaLoss(10, decay=-INF),
    'SilaLoss smoothing nan': lambda: SilaLoss(10, smoothing=NAN),
    'SilaLoss smoothing inf': lambda: SilaLoss(10, smoothing=INF),
    'SilaLoss beta numpy nan': lambda: SilaLoss(10, beta=np.float32('nan')),
    'SilaLoss beta string': lambda: SilaLoss(10, beta='0.1'),
    'SilaLoss beta bool': lambda: SilaLoss(10, beta=True),
    'SilaLoss weight nan': lambda: SilaLoss(3, weight=torch.tensor([1.0, NAN, 1.0])),
    'sila_cross_entropy beta nan': lambda: sila_cross_entropy(torch.zeros(2, 30), torch.tensor([0, 1]), 10, beta=NAN),
    'sila_cross_entropy smoothing nan': lambda: sila_cross_entropy(torch.zeros(2, 30), torch.tensor([0, 1]), 10,
                                                                   smoothing=NAN),
    'sila_log_probs decay inf': lambda: sila_log_probs(torch.zeros(2, 30), 10, decay=INF),
    'sila_set_weights beta nan': lambda: sila_set_weights(3, NAN, 0.5),
    'F.cross_entropy label_smoothing nan': lambda: F.cross_entropy(_sila_logits(), torch.tensor([0, 1]),
                                                                   label_smoothing=NAN),
    'create_model sila_beta nan': lambda: timm.create_model('sila_test_resnet', num_classes=2, sila_beta=NAN),
    'create_model sila_decay inf': lambda: timm.create_model('sila_test_resnet', num_classes=2, sila_decay=INF),
    'SilaNet beta inf': lambda: SilaNet('test_resnet', num_classes=2, beta=INF),
}


@pytest.mark.parametrize('make', BAD_HPARAMS.values(), ids=BAD_HPARAMS.keys())
def test_non_finite_hyperparameters_are_refused(make):
    with pytest.raises(ValueError, match=r'finite|beta|decay|smoothing|weight'):
        make()


# --- 2. thresholds and temperatures ---------------------------------------------------------------------------------
BAD_EXIT_VALUES = {
    'threshold nan': dict(thresholds=NAN),
    'threshold inf': dict(thresholds=INF),
    'threshold -inf': dict(thresholds=-INF),
    'one threshold nan': dict(thresholds=[0.5, NAN]),
    'numpy nan': dict(thresholds=np.float32('nan')),
    '0-d tensor inf': dict(thresholds=torch.tensor(INF)),
    'threshold string': dict(thresholds='0.5'),
    'threshold bool': dict(thresholds=True),
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


# --- 3. empty batches -------------------------------------------------------------------------------------------------
EMPTY = {
    'SilaLoss mean': (lambda: SilaLoss(10)(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)), 'nan'),
    'SilaLoss sum': (lambda: SilaLoss(10, reduction='sum')(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)), 0.0),
    'SilaLoss none': (lambda: SilaLoss(10, reduction='none')(torch.zeros(0, 30), torch.zeros(0, dtype=torch.long)),
                      (0,)),
    'SilaLoss soft mean': (lambda: SilaLoss(10)(torch.zeros(0, 30), torch.zeros(0, 10)), 'nan'),
    'nn.CrossEntropyLoss on SilaLogits': (
        lambda: nn.CrossEntropyLoss()(wrap_sila_logits(torch.zeros(0, 30), 10, 0.1, 0.5),
                                      torch.zeros(0, dtype=torch.long)), 'nan'),
    'torch itself (reference)': (lambda: F.cross_entropy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)), 'nan'),
}


@pytest.mark.parametrize('run,expected', EMPTY.values(), ids=EMPTY.keys())
def test_empty_batches_match_torch(run, expected):
    out = run()
    if expected == 'nan':
        assert out.ndim == 0 and math.isnan(out)
    elif isinstance(expected, tuple):
        assert out.shape == expected
    else:
        assert float(out) == expected


# --- 4. hostile EarlyExit files: one CheckpointError naming the file, no network, nothing written ------------------
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


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError('network access in a test')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    return attempts


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


# --- 5. exit-curve: bad values are one line, exit status 2 ---------------------------------------------------------
def _loader(n, seed=0, batch=8):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=g),
                                          torch.randint(0, 2, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


BAD_CURVE_ARGS = {
    'max_drop nan': (dict(max_drop=NAN), 16, 'max_drop'),
    'max_drop inf': (dict(max_drop=INF), 16, 'max_drop'),
    'max_drop negative': (dict(max_drop=-1.0), 16, 'max_drop'),
    'points 0': (dict(points=0), 16, 'points'),
    'empty calibration set': ({}, 0, 'calibration set is empty'),
}


@pytest.mark.parametrize('kwargs,calib_size,match', BAD_CURVE_ARGS.values(), ids=BAD_CURVE_ARGS.keys())
def test_exit_curve_bad_values(small, kwargs, calib_size, match):
    with pytest.raises(ValueError, match=match):
        exit_curve(small, _loader(calib_size), _loader(8, seed=1), timed=0, **kwargs)


@pytest.fixture(scope='module')
def cli_inputs(small, tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    g = torch.Generator().manual_seed(0)
    for split, n in (('val', 4), ('test', 4)):
        for c in ('a', 'b'):
            (root / 'data' / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(
                    root / 'data' / split / c / f'{i}.png')
    for c in ('a', 'b'):
        (root / 'data' / 'empty' / c).mkdir(parents=True)
    save_file(small.state_dict(), str(root / 'sila.safetensors'))
    return root


BAD_CLI = {
    '--max-drop nan': ['--max-drop', 'nan'],
    '--max-drop inf': ['--max-drop', 'inf'],
    '--calib-limit 0': ['--calib-limit', '0'],
    '--points 0': ['--points', '0'],
    '--batch-size 0': ['--batch-size', '0'],
    'empty calibration set': ['--calib-split', 'empty'],
    'calibration on the test split': ['--calib-split', 'test'],
}


@pytest.mark.parametrize('extra', BAD_CLI.values(), ids=BAD_CLI.keys())
def test_exit_curve_cli_bad_values_are_one_line(cli_inputs, extra, capsys):
    args = ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(cli_inputs / 'sila.safetensors'),
            '--data-dir', str(cli_inputs / 'data'), '--calib-split', 'val', '--num-classes', '2',
            '--img-size', '32', '--batch-size', '4', '--json'] + extra
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and 'error' in lines[0], captured.err


def test_exit_curve_cli_progress_and_warnings_stay_off_stdout(cli_inputs, capsys):
    args = ['exit-curve', '--model', 'sila_test_resnet', '--checkpoint', str(cli_inputs / 'sila.safetensors'),
            '--data-dir', str(cli_inputs / 'data'), '--calib-split', 'val', '--num-classes', '2',
            '--img-size', '32', '--batch-size', '4', '--points', '3', '--json']
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(result['rows']) <= 3 and sum(r['chosen'] for r in result['rows']) == 1
    assert 'exit-curve: calibration logits: 2/2 batches (8 images)' in captured.err
    assert all(line.startswith(('exit-curve:', 'timm-sila exit-curve: warning:')) for line in
               captured.err.strip().splitlines()), captured.err
