"""timm internals without a public API, used only through timm_sila.timm_compat: each is checked for the behaviour
timm_sila relies on, so a timm release that changes one fails here, by name, rather than deep in a user's run.
CI installs the newest timm setup.cfg's bound admits."""
import importlib.metadata
import json

import torch
from packaging.requirements import Requirement

import timm
from timm.models import get_arch_pretrained_cfgs, get_model_input_config
from timm.models.resnet import BasicBlock, ResNet
from timm_sila import SilaNet
from timm_sila import timm_compat


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
