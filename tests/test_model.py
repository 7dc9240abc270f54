"""SilaNet over representative timm families: shapes, gradients, taps, and bit-exact branch 0."""
import pytest
import torch

from timm_sila import SilaLogits, SilaNet
from timm_sila.taps import choose_taps

from conftest import REPRESENTATIVE, build_sila, vanilla_like

ARCHS = list(REPRESENTATIVE)


@pytest.mark.parametrize('arch', ARCHS)
def test_train_forward_and_backward_reach_every_head(arch):
    model, x = build_sila(arch)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert isinstance(out, SilaLogits)
    assert out.shape == (x.shape[0], model.sets * model.num_classes)
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([3, 7]))
    loss.backward()
    for k, head in model.heads.items():
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, f'head {k} got no gradient'
    assert model.base.get_classifier().weight.grad.abs().sum() > 0


@pytest.mark.parametrize('arch', ARCHS)
def test_eval_branch0_is_bitwise_vanilla_timm(arch):
    model, x = build_sila(arch)
    model.eval()
    model.branch = 0
    vanilla = vanilla_like(arch, model).eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (x.shape[0], model.num_classes)
        assert torch.equal(out, vanilla(x))


@pytest.mark.parametrize('arch', ARCHS)
def test_train_set0_matches_vanilla_train_forward(arch):
    model, x = build_sila(arch)
    vanilla = vanilla_like(arch, model)
    model.train()
    vanilla.train()
    with torch.no_grad():
        torch.manual_seed(0)  # same stochastic-depth / dropout draws for both
        set0 = model(x).unwrap()[:, :model.num_classes]
        torch.manual_seed(0)
        torch.testing.assert_close(set0, vanilla(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('arch', ARCHS)
def test_eval_branches_agree_with_one_pass(arch):
    model, x = build_sila(arch)
    model.eval()
    with torch.no_grad():
        all_sets = model.forward_branches(x)
        assert len(all_sets) == model.sets
        for k in range(model.sets):
            model.branch = k
            torch.testing.assert_close(model(x), all_sets[k], rtol=1e-5, atol=1e-5)
    model.branch = 0


# (rule 'depth' = the default, paper Sec 2.2; rule 'stages' = the M-1 stages before the final one, Table 3 layout)
PINNED_TAPS = {
    'resnet18': (['layer3', 'layer1'], ['layer3', 'layer2']),
    'vgg19_bn': (['features.38', 'features.25'], ['features.38', 'features.25']),
    'mobilenetv1_100': (['blocks.3', 'blocks.2'], ['blocks.3', 'blocks.2']),
    'wide_resnet50_2': (['layer3', 'layer2'], ['layer3', 'layer2']),
    'densenet121': (['features.denseblock3', 'features.denseblock2'], ['features.denseblock3', 'features.denseblock2']),
    'inception_v3': (['Mixed_6e', 'Mixed_5d'], ['Mixed_6e', 'Mixed_5d']),
    'efficientnet_b0': (['blocks.4', 'blocks.2'], ['blocks.4', 'blocks.2']),
    'convnext_atto': (['stages.2', 'stages.1'], ['stages.2', 'stages.1']),
    'regnetx_002': (['s3', 's2'], ['s3', 's2']),
    'vit_tiny_patch16_224': (['blocks.7', 'blocks.3'], ['blocks.10', 'blocks.9']),
    'swin_tiny_patch4_window7_224': (['layers.2', 'layers.1'], ['layers.2', 'layers.1']),
}


@pytest.mark.parametrize('arch', ARCHS)
def test_tap_rules_pinned(arch):
    model, _ = build_sila(arch)
    by_depth, by_stages = PINNED_TAPS[arch]
    assert model.taps == by_depth  # default rule
    for rule, expected in (('depth', by_depth), ('stages', by_stages)):
        got = choose_taps(model.stages, model.total_depth, model.sets, rule)
        assert [model.stages[i].module for i in got] == expected, rule


def test_tap_rule_by_name_builds_those_taps():
    model = SilaNet('resnet18', num_classes=10, taps='stages')
    assert model.taps == ['layer3', 'layer2']
    assert model.tap_args() == ['layer3', 'layer2']  # checkpoints record the resolved stages, not the rule
    with pytest.raises(ValueError, match='not a stage'):
        SilaNet('resnet18', num_classes=10, sets=2, taps='by_width')


def test_depth_rule_picks_nearest_stage_per_set():
    from timm_sila.taps import Stage
    # D = 24, M = 3: targets 16 and 8; depths 3, 7, 12, 17, 24 -> 17 (index 3) and 7 (index 1)
    stages = [Stage(f's{i}', 8, d) for i, d in enumerate([3, 7, 12, 17, 24])]
    assert choose_taps(stages, 24, 3) == [3, 1]
    assert choose_taps(stages, 24, 3, 'stages') == [3, 2]


def test_tap_rule_ties_go_deeper():
    from timm_sila.taps import Stage
    stages = [Stage(f's{i}', 8, d) for i, d in enumerate([2, 4, 8, 12, 16])]
    # D = 12, M = 2: target 6 is equidistant from depths 4 and 8 -> the deeper stage (index 2)
    assert choose_taps(stages, 12, 2) == [2]


def test_explicit_taps_by_name_and_index():
    model = SilaNet('resnet18', num_classes=10, taps=['layer2', 1])
    assert model.taps == ['layer2', 'layer1'] and model.tap_indices == [2, 1]


def test_base_instance_is_kept_unmodified():
    import timm
    base = timm.create_model('resnet18', num_classes=10)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = SilaNet(base, num_classes=10)
    assert model.base is base
    assert set(model.state_dict()) == {f'base.{k}' for k in before} | {
        f'heads.{k}.{p}' for k in ('1', '2') for p in ('weight', 'bias')}
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_timm_tooling_protocol():
    import timm
    from timm.optim import create_optimizer_v2
    model = timm.create_model('sila_vit_tiny_patch16_224', num_classes=10, img_size=32)
    assert {'base.pos_embed', 'base.cls_token'} <= model.no_weight_decay()
    assert model.pretrained_cfg['architecture'] == 'sila_vit_tiny_patch16_224'
    assert model.pretrained_cfg['classifier'] == 'base.head'
    assert model.default_cfg['mean'] == timm.create_model('vit_tiny_patch16_224').pretrained_cfg['mean']
    # layer-wise lr decay uses group_matcher; every parameter lands in a group, heads in the last one
    opt = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4, layer_decay=0.75)
    n_params = sum(len(g['params']) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    head_groups = [g for g in opt.param_groups if any(p is model.heads['1'].weight for p in g['params'])]
    assert head_groups[0]['lr_scale'] == max(g['lr_scale'] for g in opt.param_groups)
    model.set_grad_checkpointing(True)
    assert model.base.grad_checkpointing
    model.reset_classifier(5)
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 15)
