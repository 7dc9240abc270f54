"""Stage probing at construction (taps.probe_stages): the cheap attempts give exactly what a full-size forward gives."""
import pytest
import torch

import timm
from timm_sila import SilaNet
from timm_sila import taps as taps_mod
from timm_sila.taps import _feature_entries, _probe, _probe_attempts, probe_input_shape, probe_stages

# flexible-size CNNs (probed 'small'), a fixed-size ViT (probed 'full', or 'meta' when large), a hierarchical one
ARCHS = ['resnet18', 'efficientnet_b0', 'densenet121', 'test_vit', 'test_convnext', 'test_efficientnet']


@pytest.mark.parametrize('arch', ARCHS)
def test_every_probe_input_gives_the_full_size_stages(arch):
    model = timm.create_model(arch, num_classes=10)
    entries = _feature_entries(model)
    full = _probe(model, entries, 'full', probe_input_shape(model))
    assert _probe(model, entries, 'meta', probe_input_shape(model)) == full
    for how, shape in _probe_attempts(model):
        assert _probe(model, entries, how, shape) == full, how
    assert probe_stages(model) == full


def test_flexible_model_is_probed_small_not_at_full_size():
    base = timm.create_model('resnet18', num_classes=10)  # built for 224x224
    seen = []
    hook = base.conv1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        SilaNet(base)
    finally:
        hook.remove()
    assert seen == [(1, 3, 32, 32)]


def test_large_fixed_size_model_is_probed_on_meta_and_keeps_its_weights(monkeypatch):
    base = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=64)
    assert [h for h, _ in _probe_attempts(base)] == ['full']  # 0.04 GMAC: a real forward is cheaper
    monkeypatch.setattr(taps_mod, 'META_PROBE_MACS', 0.0)
    assert [h for h, _ in _probe_attempts(base)] == ['meta', 'full']
    state = {k: v.clone() for k, v in base.state_dict().items()}
    devices = []
    hook = base.patch_embed.register_forward_pre_hook(lambda m, args: devices.append(args[0].device.type))
    try:
        net = SilaNet(base)
    finally:
        hook.remove()
    assert devices == ['meta']
    assert all(torch.equal(v, net.base.state_dict()[k]) for k, v in state.items())
    assert all(t.device.type == 'cpu' for t in net.state_dict().values())
    monkeypatch.undo()
    assert net.stages == SilaNet(timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=64)).stages


def test_a_model_the_meta_device_cannot_run_falls_back_to_a_real_forward(monkeypatch):
    base = timm.create_model('test_vit', num_classes=10)
    expected = probe_stages(base)
    monkeypatch.setattr(taps_mod, 'META_PROBE_MACS', 0.0)
    real = taps_mod.get_model_input_config
    monkeypatch.setattr(taps_mod, 'get_model_input_config', lambda m: dict(real(m), fixed_input_size=True))

    def no_meta(module, args):
        if args[0].device.type == 'meta':
            raise NotImplementedError('no meta kernel')
    hook = base.patch_embed.register_forward_pre_hook(no_meta)
    try:
        assert [h for h, _ in _probe_attempts(base)] == ['meta', 'full']
        assert probe_stages(base) == expected
    finally:
        hook.remove()


def test_probe_failure_at_every_input_is_one_clear_error():
    base = timm.create_model('test_vit', num_classes=10)
    hook = base.patch_embed.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError('boom')))
    try:
        with pytest.raises(ValueError, match=r'Cannot run .*forward_intermediates.*boom'):
            probe_stages(base)
    finally:
        hook.remove()
