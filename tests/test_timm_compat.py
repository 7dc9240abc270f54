"""timm internals without a public API, used only through timm_sila._timm_compat: each is checked for the behaviour
timm_sila relies on, so a timm release that changes one fails here, by name, rather than deep in a user's run.
CI installs the newest timm setup.cfg's bound admits."""
import importlib.metadata
import json

import pytest
import torch
from packaging.requirements import Requirement
from safetensors.torch import save_file

import timm
from timm.models import get_arch_pretrained_cfgs, get_model_input_config
from timm.models._hub import load_state_dict_from_path
from timm.models.resnet import BasicBlock, ResNet
from conftest import train_py_checkpoint
from timm_sila import SilaNet
from timm_sila import _timm_compat as timm_compat
from timm_sila._registry import _local_dir_weights


def test_installed_timm_is_within_the_declared_bound_and_the_bound_is_closed():
    (req,) = [Requirement(r) for r in importlib.metadata.requires('timm-sila') if r.startswith('timm')]
    assert any(s.operator == '<' for s in req.specifier), f'{req}: timm needs an upper bound'
    assert timm.__version__ in req.specifier, f'timm {timm.__version__} is outside {req}'
    assert timm_compat.TESTED_TIMM in req.specifier


def test_model_args_are_the_create_model_kwargs():
    model = timm.create_model('resnet18', num_classes=7, drop_rate=0.25)
    args = timm_compat.model_args(model)
    assert args['num_classes'] == 7 and args['drop_rate'] == 0.25
    args['num_classes'] = 3  # a copy
    assert timm_compat.model_args(model)['num_classes'] == 7
    assert timm_compat.model_args(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=7)) == {}


def test_built_by_timm_and_copied_traits_feed_get_model_input_config():
    base = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=48)
    assert timm_compat.built_by_timm(base) and not timm_compat.built_by_timm(ResNet(BasicBlock, [1, 1, 1, 1]))
    assert get_model_input_config(base)['input_size'] == (3, 48, 48)
    net = SilaNet(base)
    cfg = get_model_input_config(net)
    assert cfg['input_size'] == (3, 48, 48) and cfg['fixed_input_size']
    assert cfg['first_conv'] == 'base.' + get_model_input_config(base)['first_conv']
    assert isinstance(net.get_submodule(cfg['first_conv']), torch.nn.Conv2d)


def test_arch_pretrained_cfgs_equal_the_public_copies_for_every_architecture():
    for arch in timm.list_models(pretrained=False):
        if arch.startswith('sila_'):
            continue
        ours = timm_compat.arch_pretrained_cfgs(arch)
        public = get_arch_pretrained_cfgs(arch)
        assert list(ours) == list(public), arch
        assert all(ours[k].to_dict() == public[k].to_dict() for k in ours), arch


def test_group_with_matcher_covers_every_parameter_in_order():
    model = timm.create_model('resnet18', num_classes=10)
    groups = timm_compat.group_with_matcher(model.named_parameters(), model.group_matcher())
    names = [n for ordinal in sorted(groups) for n in groups[ordinal]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert names[0].startswith('conv1') and names[-1].startswith('fc')


def test_save_config_for_hf_writes_what_timm_reads_back(tmp_path):
    model = timm.create_model('resnet18', num_classes=7)
    path = tmp_path / 'config.json'
    timm_compat.save_config_for_hf(model, path, model_args={'num_classes': 7}, data_config={'crop_pct': 0.9})
    config = json.loads(path.read_text())
    assert config['architecture'] == 'resnet18' and config['num_classes'] == 7
    assert config['model_args']['num_classes'] == 7
    assert config['pretrained_cfg']['crop_pct'] == 0.9
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# Functions in timm.models whose code branches on `pretrained` but builds the same module (they change loading only).
_PRETRAINED_BRANCHES_THAT_ONLY_LOAD = {('iformer', '_create_iformer')}


def test_every_timm_function_that_branches_on_pretrained_is_pinned_or_load_only():
    """A timm function that builds another module for pretrained=True (as `local-dir:` loading calls it) would reload
    a stripped folder as a different model: each `if`/conditional on `pretrained` in timm.models is either pinned
    in timm_compat or known to change loading only. A new timm with another one fails here, by name."""
    import ast
    import re
    from pathlib import Path

    def uses_pretrained(test):
        return any(isinstance(n, ast.Name) and n.id == 'pretrained' for n in ast.walk(test))

    found = set()
    for path in sorted(Path(timm.models.__file__).parent.glob('[!_]*.py')):  # model modules, not the builders
        text = path.read_text(encoding='utf-8')
        if not re.search(r'\b(if|while)\b[^\n]*\bpretrained\b', text):  # no condition on it: skip the parse
            continue
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    isinstance(n, (ast.If, ast.IfExp, ast.While)) and uses_pretrained(n.test) for n in ast.walk(fn)):
                found.add((path.stem, fn.name))
    pinned = {(m, f) for m, f in found if f in timm_compat._PRETRAINED_DEPENDENT}
    assert {f for _, f in pinned} == set(timm_compat._PRETRAINED_DEPENDENT)
    assert found - pinned == _PRETRAINED_BRANCHES_THAT_ONLY_LOAD, (
        f'timm {timm.__version__}: functions that branch on pretrained {sorted(found - pinned)} differ from the known '
        f'load-only ones {sorted(_PRETRAINED_BRANCHES_THAT_ONLY_LOAD)}; read them, then pin the ones that change the '
        f'module in timm_compat._PRETRAINED_DEPENDENT.')


@pytest.mark.parametrize('bn_eps', [None, 1e-3], ids=['default-eps', 'pretrained-eps'])
def test_fbnetc_strips_to_folders_that_plain_timm_reloads_as_the_same_model(tmp_path, bn_eps):
    """fbnetc_100 sets bn_eps=1e-3 only when pretrained=True: a folder must reload with the eps it was trained with."""
    import timm_sila
    kwargs = {} if bn_eps is None else dict(bn_eps=bn_eps)
    torch.manual_seed(0)
    net = timm.create_model('sila_fbnetc_100', num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for branch in (0, 1):
        net.branch = branch
        with torch.no_grad():
            ref = net(x)
        folder = timm_sila.strip(net, branch=branch, out_dir=tmp_path / f'b{branch}', card=False)
        model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
        with torch.no_grad():
            out = model(x)
        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert eps == {bn_eps or 1e-5}, f'branch {branch} reloaded with BN eps {eps}'
        assert torch.equal(out, ref), f'branch {branch}: max |diff| {(out - ref).abs().max()}'


def test_pretrained_form_args_build_what_pretrained_true_builds(tmp_path):
    from safetensors.torch import save_file
    for arch in timm_compat._PRETRAINED_DEPENDENT:
        weights = tmp_path / f'{arch}.safetensors'
        save_file(timm.create_model(arch, num_classes=10).state_dict(), str(weights))
        loaded = timm.create_model(arch, num_classes=10, pretrained=True,  # the entrypoint's pretrained branch,
                                   pretrained_cfg_overlay=dict(file=str(weights), num_classes=10))  # from a local file
        built = timm.create_model(arch, num_classes=10, **timm_compat.pretrained_form_args(arch, {}))
        assert timm_compat.pretrained_form_args(arch, {}) and repr(built) == repr(loaded)
        assert repr(timm.create_model(arch, num_classes=10)) != repr(loaded)


@pytest.mark.parametrize('from_pretrained', [False, True])
def test_trainpy_checkpoint_from_pretrained_fbnetc_rebuilds_its_bn_eps(tmp_path, from_pretrained):
    """train.py --pretrained builds fbnetc_100 with BN eps 1e-3; its checkpoint must be rebuilt so (and stripped so)."""
    import timm_sila
    eps = 1e-3 if from_pretrained else 1e-5
    torch.manual_seed(0)
    net = timm.create_model('sila_fbnetc_100', num_classes=10, bn_eps=eps).eval()
    path = tmp_path / 'last.pth.tar'
    train_py_checkpoint(path, net, 'sila_fbnetc_100', args_as_dict=True, pretrained=from_pretrained)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loaded = timm_sila.load_silanet(path)
    assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {eps}
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    folder = timm_sila.strip(path, branch=0, out_dir=tmp_path / 'b0', card=False)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f'local-dir:{folder}', pretrained=True).eval()(x), net(x))


def test_fbnetc_with_its_own_norm_layer_is_not_pinned(tmp_path):
    """With a norm_layer the entrypoint takes no bn_eps: nothing is pinned, and the folder loads as it was built."""
    import timm_sila
    torch.manual_seed(0)
    net = timm.create_model('sila_fbnetc_100', num_classes=10, norm_layer='batchnorm').eval()
    assert timm_compat.pinned_args('fbnetc_100', net.base) == {}
    assert timm_compat.pretrained_form_args('fbnetc_100', dict(norm_layer='batchnorm')) == {}
    folder = timm_sila.strip(net, branch=0, out_dir=tmp_path / 'b0', card=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(timm_sila.load_stripped(folder)(x), net(x))


@pytest.mark.parametrize('present', [
    ['model.safetensors', 'pytorch_model.bin', 'a.pth'],
    ['pytorch_model.bin', 'model.pth', 'b.safetensors'],
    ['b.bin', 'a.pth.tar', 'z.pth'],
    ['b.bin', 'c.bin'],
])
def test_local_dir_file_choice_is_timms(tmp_path, present):
    """timm_sila's local-dir loader reads the file timm's `load_state_dict_from_path` would read."""
    for i, name in enumerate(present):
        tensors = {'w': torch.full((1,), float(i))}
        if name.endswith('.safetensors'):
            save_file(tensors, str(tmp_path / name))
        else:
            torch.save(tensors, tmp_path / name)
    timms = load_state_dict_from_path(tmp_path)['w'].item()
    ours = _local_dir_weights(tmp_path, 'sila_x')
    assert ours.name == present[int(timms)]
