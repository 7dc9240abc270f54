"""Only the work a branch needs: branch k >= 1 runs the backbone up to its tap; training runs it once."""
import collections

import pytest
import torch

import timm

from conftest import REPRESENTATIVE, build_sila

_WEIGHT_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


class CallCounter:
    """Counts forward calls of named submodules of a model (forward hooks), plus all its conv/linear calls."""

    def __init__(self, model, names):
        self.calls = collections.Counter()
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]
        self.handles += [m.register_forward_hook(self._hook('<weight layer>'))
                         for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)]

    def _hook(self, name):
        return lambda *_: self.calls.update([name])

    def __enter__(self):
        self.calls.clear()
        return self.calls

    def __exit__(self, *exc):
        pass

    def remove(self):
        for h in self.handles:
            h.remove()


def _classifier_name(base):
    classifier = base.get_classifier()
    return next(n for n, m in base.named_modules() if m is classifier)


def _resnet18(**kwargs):
    if not kwargs:
        return build_sila('resnet18')[0]
    torch.manual_seed(0)
    return timm.create_model('sila_resnet18', num_classes=10, **kwargs)


X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('branch,unused,used', [
    (1, ['layer4', 'fc'], ['layer1', 'layer2', 'layer3']),  # tap layer3
    (2, ['layer2', 'layer3', 'layer4', 'fc'], ['layer1']),  # tap layer1
])
def test_resnet18_branch_eval_stops_at_its_tap(branch, unused, used):
    model = _resnet18().eval()
    assert model.taps == ['layer3', 'layer1']
    model.branch = branch
    counter = CallCounter(model.base, unused + used)
    with counter as calls, torch.no_grad():
        model(X32)
    assert all(calls[n] == 0 for n in unused), dict(calls)
    assert all(calls[n] == 1 for n in used), dict(calls)
    # no stray compute either: exactly the conv/linear layers up to the tap ran
    assert calls['<weight layer>'] == model.stages[model.tap_indices[branch - 1]].depth


@pytest.mark.parametrize('branch', [1, 2])
def test_resnet18_stripped_has_no_later_modules_and_matches_full_branch(branch):
    full = _resnet18().eval()
    full.branch = branch
    stripped = _resnet18(sila_branch=branch, sila_stripped=True).eval()
    names = {n for n, _ in stripped.base.named_children()}
    later = {1: ['layer4', 'fc'], 2: ['layer2', 'layer3', 'layer4', 'fc']}[branch]
    # pruned modules are gone or replaced by parameter-free Identity
    for n in later:
        assert n not in names or not any(True for _ in stripped.base.get_submodule(n).parameters()), n
    assert not any(k.startswith(tuple(f'base.{n}.' for n in later)) for k in stripped.state_dict())
    assert set(stripped.heads.keys()) == {str(branch)}
    state = full.state_dict()
    missing = stripped.load_state_dict({k: state[k] for k in stripped.state_dict()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    counter = CallCounter(stripped.base, [])
    with counter as calls, torch.no_grad():
        out = stripped(X32)
    assert calls['<weight layer>'] == full.stages[full.tap_indices[branch - 1]].depth
    with torch.no_grad():
        torch.testing.assert_close(out, full(X32), rtol=0, atol=0)
    assert sum(p.numel() for p in stripped.parameters()) < sum(p.numel() for p in full.parameters())


def test_resnet18_train_is_one_backbone_pass():
    model = _resnet18().train()
    stages = ['conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
    counter = CallCounter(model.base, stages)
    head_counter = CallCounter(model, [f'heads.{k}' for k in model.heads])
    with counter as calls, head_counter as head_calls:
        model(X32).unwrap().sum().backward()  # unwrap: only counting calls here, not training
    assert all(calls[n] == 1 for n in stages), dict(calls)
    assert calls['<weight layer>'] == model.total_depth
    assert all(head_calls[f'heads.{k}'] == 1 for k in model.heads), dict(head_calls)
    counter.remove(), head_counter.remove()


# a CNN per style plus both transformer families, from conftest.REPRESENTATIVE
FAMILIES = ['resnet18', 'efficientnet_b0', 'convnext_atto', 'vit_tiny_patch16_224', 'swin_tiny_patch4_window7_224']
assert set(FAMILIES) <= set(REPRESENTATIVE)


@pytest.mark.parametrize('arch', FAMILIES)
def test_families_branch_eval_runs_only_the_prefix(arch):
    """forward_intermediates(stop_early=True) is honoured: no stage after the tap, no classifier, no extra layer."""
    model, x = build_sila(arch)
    stage_names = [s.module for s in model.stages]
    counter = CallCounter(model.base, stage_names + [_classifier_name(model.base)])
    try:
        model.eval()
        for k in range(1, model.sets):
            model.branch = k
            tap = model.tap_indices[k - 1]
            with counter as calls, torch.no_grad():
                model(x)
            later = [n for n in stage_names[tap + 1:] + [_classifier_name(model.base)] if calls[n]]
            assert not later, f'{arch} branch {k} (tap {stage_names[tap]}) still ran {later}'
            assert all(calls[n] == 1 for n in stage_names[:tap + 1]), dict(calls)
            assert calls['<weight layer>'] == model.stages[tap].depth, (arch, k, dict(calls))
        model.train()
        with counter as calls, torch.no_grad():
            model(x)
        assert all(calls[n] == 1 for n in stage_names), f'{arch} train forward is not one pass: {dict(calls)}'
        assert calls['<weight layer>'] == model.total_depth
    finally:
        counter.remove()
        model.branch = 0
