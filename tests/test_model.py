"""SilaNet over representative timm families: shapes, gradients and bit-exact branch 0; the base instance it wraps
and the protocol timm's tooling expects (no_weight_decay, group_matcher, reset_classifier)."""
import pytest
import torch

from timm_sila import SilaLogits, SilaNet

from conftest import REPRESENTATIVE, build_sila, vanilla_like

# vgg19_bn's build (about 20 M parameters at 10 classes) makes each of its cases slow as pyproject.toml defines it
ARCHS = [pytest.param(a, marks=pytest.mark.slow) if a == 'vgg19_bn' else a for a in REPRESENTATIVE]


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
