"""strip(): one branch of a SilaNet written as timm's model.safetensors + config.json (paper Sec 2.3, Table 3);
load_stripped() of a folder that is not whole (config.json or weights) is one error naming the file."""
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import timm
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import branch_logits, eval_logits, train_py_checkpoint
from timm_sila import CheckpointError, SilaNet, load_stripped, strip
from timm_sila.io.atomic import MANIFEST_NAME, ForeignFilesError

EXPORT = sorted(['README.md', 'config.json', 'model.safetensors', MANIFEST_NAME])  # what strip writes
TAPS = ['layer3', 'layer1']  # the paper's rule for resnet18 with 3 sets (set 1 = deepest)
KEPT = {1: ('conv1', 'bn1', 'layer1', 'layer2', 'layer3'), 2: ('conv1', 'bn1', 'layer1')}


def file_keys(out):
    with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def train_checkpoint(path, net, ema_net=None, args=True, prefix=''):
    """A checkpoint as timm train.py's CheckpointSaver writes it (optimizer state, metric), its keys prefixed."""
    entries = dict(epoch=2, state_dict={prefix + k: v for k, v in net.state_dict().items()}, metric=55.0,
                   optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).state_dict())
    if not args:
        entries['arch'] = 'silanet'  # what CheckpointSaver records without args
    return train_py_checkpoint(path, net, 'sila_resnet18', ema=ema_net, with_args=args, entries=entries,
                               model_kwargs={'sila_sets': 3, 'sila_beta': 0.1}, img_size=32, lr=0.1, epochs=3,
                               model_ema=ema_net is not None)


# --- branch 0: the plain timm model -------------------------------------------------------------------------
FRESH_PROCESS = r'''
import json, sys, torch, timm
out, data = sys.argv[1], torch.load(sys.argv[2])
x, want = data['x'], data['logits']
a = timm.create_model('local-dir:' + out, pretrained=True).eval()
file = out + '/model.safetensors'
# timm keeps the registry cfg's num_classes (1000) unless the overlay says otherwise, and then drops the classifier
b = timm.create_model('resnet18', num_classes=10, pretrained=True,
                      pretrained_cfg_overlay=dict(file=file, num_classes=10)).eval()
c = timm.create_model('resnet18', num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
with torch.no_grad():
    equal = [torch.equal(a(x), want), torch.equal(b(x), want),
             torch.equal(c.forward_head(c.forward_features(x), pre_logits=True), data['features'])]
print(json.dumps(dict(equal=equal, cls=type(a).__name__,
                      sila_imported=any(m.startswith('timm_sila') for m in sys.modules))))
'''


@pytest.mark.slow
def test_branch0_loads_bitwise_equal_in_plain_timm(trained, tmp_path):
    net, x = trained
    out = strip(net, branch=0, out_dir=tmp_path / 'b0')
    assert sorted(p.name for p in out.iterdir()) == EXPORT
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'resnet18' and cfg['num_classes'] == 10
    assert cfg['model_args']['num_classes'] == 10
    assert {'input_size', 'mean', 'std'} <= set(cfg['pretrained_cfg'])
    tensors = file_keys(out)
    assert set(tensors) == set(timm.create_model('resnet18', num_classes=10).state_dict())  # no heads.*
    data = tmp_path / 'data.pt'
    with torch.no_grad():
        features = net.base.forward_head(net.base.forward_features(x), pre_logits=True)
    torch.save(dict(x=x, logits=branch_logits(net, x, 0), features=features), data)
    run = subprocess.run([sys.executable, '-c', FRESH_PROCESS, str(out), str(data)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == dict(equal=[True, True, True], cls='ResNet', sila_imported=False)


@pytest.mark.parametrize('branch', [0, 1])
def test_config_holds_only_what_is_true_of_the_export(tmp_path, branch):
    """A base created from a tagged name (weights a1_in1k, hub id, license, paper) is exported with other
    weights: config.json keeps the data config, never the tag or the origin of weights it does not hold."""
    net = timm.create_model('sila_resnet18.a1_in1k', num_classes=10)  # the tag's cfg, random weights
    assert net.pretrained_cfg['tag'] == 'a1_in1k' and net.base.pretrained_cfg.get('hf_hub_id')
    out = strip(net, branch, tmp_path / 'out')
    cfg = json.loads((out / 'config.json').read_text())
    pretrained = cfg['pretrained_cfg']
    assert not {'tag', 'url', 'hf_hub_id', 'hf_hub_filename', 'file', 'source', 'license', 'origin_url',
                'paper_ids', 'paper_name', 'notes', 'label_names'} & set(pretrained)
    assert 'a1_in1k' not in json.dumps(cfg) and 'http' not in json.dumps(cfg)
    assert (pretrained['mean'], pretrained['std'], pretrained['crop_pct'], pretrained['interpolation']) == (
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 0.95, 'bicubic')  # a1_in1k's data config is kept
    assert pretrained['num_classes'] == cfg['num_classes'] == 10
    assert load_stripped(out).pretrained_cfg['crop_pct'] == 0.95


# --- branch k >= 1: the stripped sila_<arch> ----------------------------------------------------------------
@pytest.mark.parametrize('branch', [1, 2])
def test_branch_k_keeps_only_prefix_and_head(trained, tmp_path, branch):
    net, x = trained
    assert net.taps == TAPS
    out = strip(net, branch=branch, out_dir=tmp_path / f'b{branch}')
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'sila_resnet18'
    args = cfg['model_args']
    assert (args['sila_branch'], args['sila_stripped'], args['sila_taps'], args['sila_sets']) == (
        branch, True, TAPS, 3)
    expected = {f'base.{k}' for k in timm.create_model('resnet18').state_dict() if k.split('.')[0] in KEPT[branch]}
    expected |= {f'heads.{branch}.weight', f'heads.{branch}.bias'}
    tensors = file_keys(out)
    assert set(tensors) == expected
    source = net.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in tensors.items())

    if branch == 1:  # what load_stripped does, spelled out
        model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    else:
        model = load_stripped(out)
    assert isinstance(model, SilaNet) and not model.training and model.stripped and model.branch == branch
    assert list(model.heads.keys()) == [str(branch)]
    names = [n for n, _ in model.named_parameters()]
    for gone in ('base.layer4', 'base.fc') + (('base.layer2', 'base.layer3') if branch == 2 else ()):
        assert not any(n.startswith(gone) for n in names), gone
    assert len(model.base.layer4) == 0 and isinstance(model.base.fc, nn.Identity)
    assert torch.equal(eval_logits(model, x), branch_logits(net, x, branch))


def test_vit_records_img_size(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model('sila_vit_tiny_patch16_224', num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    for branch in (0, 1):
        out = strip(net, branch=branch, out_dir=tmp_path / f'b{branch}')
        cfg = json.loads((out / 'config.json').read_text())
        assert cfg['model_args']['img_size'] == [32, 32] or cfg['model_args']['img_size'] == 32
        assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
        model = load_stripped(out)
        assert torch.allclose(eval_logits(model, x), branch_logits(net, x, branch), rtol=0, atol=1e-6)
    assert len(load_stripped(tmp_path / 'b1').base.blocks) < len(net.base.blocks)


def test_architecture_without_pruning_exports_branch0_only(trained, tmp_path):
    base = timm.create_model('resnet18', num_classes=10)
    base.__class__ = type('LegacyResNet', (type(base),), {'prune_intermediate_layers': None})
    net = SilaNet(base, num_classes=10).eval()
    with pytest.raises(ValueError, match='no prune_intermediate_layers'):
        strip(net, branch=1, out_dir=tmp_path / 'b1')
    assert not (tmp_path / 'b1').exists()
    x = trained[1]
    assert torch.equal(eval_logits(load_stripped(strip(net, 0, tmp_path / 'b0')), x), branch_logits(net, x, 0))


# --- checkpoint files ---------------------------------------------------------------------------------------
def ema_like(net):
    """A copy of `net` with every parameter nudged, standing in for EMA weights that differ from the model's."""
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return ema


def test_train_checkpoint_with_ema(trained, tmp_path):
    net, x = trained
    ema = ema_like(net)
    path = train_checkpoint(tmp_path / 'last.pth.tar', net, ema_net=ema)
    plain = load_stripped(strip(path, branch=0, out_dir=tmp_path / 'plain'))
    averaged = load_stripped(strip(path, branch=1, out_dir=tmp_path / 'ema', ema=True))
    assert torch.equal(eval_logits(plain, x), branch_logits(net, x, 0))
    assert torch.equal(eval_logits(averaged, x), branch_logits(ema, x, 1))
    assert not torch.equal(branch_logits(net, x, 1), branch_logits(ema, x, 1))
    cfg = json.loads((tmp_path / 'ema' / 'config.json').read_text())
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]  # from train.py's args.img_size


@pytest.mark.parametrize('kind,branch', [('ddp_without_args', 0), ('state_dict', 2), ('safetensors', 0)])
def test_files_that_need_the_model_name(trained, tmp_path, kind, branch):
    net, x = trained
    if kind == 'ddp_without_args':
        path = train_checkpoint(tmp_path / 'ckpt.pth.tar', net, args=False, prefix='module.')
    elif kind == 'state_dict':
        path = tmp_path / 'model.pth'
        torch.save(net.state_dict(), path)
    else:
        path = tmp_path / 'model.safetensors'
        save_file(net.state_dict(), str(path))
    with pytest.raises(CheckpointError, match='does not say which SilaNet'):
        strip(path, branch=0, out_dir=tmp_path / 'x')
    # num_classes and sets follow from the heads in the state_dict
    model = load_stripped(strip(path, branch=branch, out_dir=tmp_path / 'b', model='sila_resnet18'))
    assert torch.equal(eval_logits(model, x), branch_logits(net, x, branch))


@pytest.mark.parametrize('prefix', ['_orig_mod.', 'module._orig_mod.', '_orig_mod.module.'])
def test_compiled_and_ddp_model_keys_are_cleaned_as_timm_does(trained, tmp_path, prefix):
    net, x = trained  # torch.compile(model).state_dict() prefixes '_orig_mod.'; DDP 'module.', in either order
    path = train_checkpoint(tmp_path / 'ckpt.pth.tar', net, prefix=prefix)
    model = load_stripped(strip(path, branch=1, out_dir=tmp_path / 'b'))
    assert torch.equal(eval_logits(model, x), branch_logits(net, x, 1))


def test_model_ema_key_holds_ema_weights_as_for_timm(trained, tmp_path):
    net, x = trained
    ema = ema_like(net)
    path = train_checkpoint(tmp_path / 'ckpt.pth.tar', net)
    ckpt = torch.load(path, weights_only=False)
    ckpt['model_ema'] = {f'_orig_mod.{k}': v for k, v in ema.state_dict().items()}
    torch.save(ckpt, path)
    model = load_stripped(strip(path, branch=2, out_dir=tmp_path / 'ema', ema=True))
    assert torch.equal(eval_logits(model, x), branch_logits(ema, x, 2))


# --- errors -------------------------------------------------------------------------------------------------
class NotAllowed:
    pass


def test_checkpoint_errors(trained, tmp_path):
    net, _ = trained
    out = tmp_path / 'out'
    with pytest.raises(FileNotFoundError, match='does not exist'):
        strip(tmp_path / 'missing.pth.tar', 0, out)

    good = train_checkpoint(tmp_path / 'good.pth.tar', net)
    data = good.read_bytes()
    (tmp_path / 'cut.pth.tar').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        strip(tmp_path / 'cut.pth.tar', 0, out)
    save_file(net.state_dict(), str(tmp_path / 'w.safetensors'))
    data = (tmp_path / 'w.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        strip(tmp_path / 'cut.safetensors', 0, out, model='sila_resnet18')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        strip(tmp_path / 'empty.pth', 0, out)

    torch.save({'state_dict': net.state_dict(), 'extra': NotAllowed()}, tmp_path / 'pickle.pth')
    with pytest.raises(CheckpointError, match='Refusing to load'):
        strip(tmp_path / 'pickle.pth', 0, out, model='sila_resnet18')

    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), tmp_path / 'vanilla.pth')
    with pytest.raises(CheckpointError, match='not a SilaNet checkpoint'):
        strip(tmp_path / 'vanilla.pth', 0, out, model='sila_resnet18')

    with pytest.raises(CheckpointError, match=r'sila_sets \(given\) = 4 but the weights hold 2 auxiliary heads'):
        strip(good, 0, out, sets=4, taps=['layer3', 'layer2', 'layer1'])
    with pytest.raises(CheckpointError, match=r'does not match sila_resnet10t.*unexpected keys \(base\.conv1\.weight'):
        strip(good, 0, out, model='resnet10t')
    with pytest.raises(CheckpointError, match=r'shape mismatches.*heads\.1\.weight'):
        strip(good, 0, out, taps=['layer2', 'layer1'])

    with pytest.raises(CheckpointError, match='no state_dict_ema'):
        strip(good, 0, out, ema=True)
    for bad in (3, -1, True):
        with pytest.raises(ValueError, match='out of range'):
            strip(good, bad, out)
    assert not out.exists()  # nothing was written by any failure


def test_output_folder_rules(trained, tmp_path):
    net, x = trained
    with pytest.raises(ValueError, match='needs out_dir'):
        strip(net, 0)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(NotADirectoryError):
        strip(net, 0, tmp_path / 'file')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('keep me')
    with pytest.raises(FileExistsError, match='not empty'):
        strip(net, 0, out)
    with pytest.raises(ForeignFilesError, match='notes.txt'):  # overwrite replaces only files strip wrote
        strip(net, 0, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ['notes.txt'] and (out / 'notes.txt').read_text() == 'keep me'
    (out / 'notes.txt').unlink()
    strip(net, 2, out)
    strip(net, 0, out, overwrite=True)
    assert torch.equal(eval_logits(load_stripped(out), x), branch_logits(net, x, 0))
    assert not [p for p in out.iterdir() if p.name.startswith('.timm-sila-tmp-')]


# --- a stripped folder that is not whole: the file is named ----------------------------------------------------
@pytest.mark.usefixtures('no_network')
@pytest.mark.parametrize('content', [b'{not json', b'\xff\xfe\x00', b'[]', b'"text"', b''])
def test_malformed_config_json_names_the_file(stripped_copy, tmp_path, content):
    export = stripped_copy(0, tmp_path / 'export')
    (export / 'config.json').write_bytes(content)
    with pytest.raises(CheckpointError, match='config.json'):
        load_stripped(export)


@pytest.mark.usefixtures('no_network')
@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty', 'header_only'])
def test_malformed_weights_name_the_file(stripped_copy, tmp_path, damage):
    export = stripped_copy(0, tmp_path / 'export')
    weights = export / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes({'truncated': data[:len(data) // 2], 'garbage': b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}',
                         'empty': b'', 'header_only': data[:8]}[damage])
    with pytest.raises(CheckpointError, match='model.safetensors'):
        load_stripped(export)
