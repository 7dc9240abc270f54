"""timm_sila.taps: the stages a model offers (probed at construction) and the rules that pick its taps.

Stage probing: the cheap attempts (a small input, the meta device) give exactly what a full-size forward gives. Tap
rules: 'depth' (the default, paper Sec 2.2: the stage nearest each target depth, ties deeper) and 'stages' (the
M-1 stages before the final one), pinned per family; explicit taps by name or index; stages that end with the final
one are no taps.
"""
import pytest
import torch

import timm
from timm_sila import SilaNet
from timm_sila import taps as taps_mod
from timm_sila.taps import _feature_entries, _probe, _probe_attempts, choose_taps, probe_input_shape, probe_stages

from conftest import REPRESENTATIVE, build_sila

ARCHS = list(REPRESENTATIVE)

# --- stage probing ------------------------------------------------------------------------------------------------
# flexible-size CNNs (probed 'small'), a fixed-size ViT (probed 'full', or 'meta' when large), a hierarchical one
PROBE_ARCHS = ['resnet18', 'efficientnet_b0', 'densenet121', 'test_vit', 'test_convnext', 'test_efficientnet']


@pytest.mark.parametrize('arch', PROBE_ARCHS)
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


# --- tap rules ----------------------------------------------------------------------------------------------------
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


def test_taps_skip_stages_that_end_with_the_final_one():
    # CoaT-tiny's feature_info stages 1-3 all come out of its parallel blocks, as deep as the final stage: an exit
    # there would run the whole backbone, so they are no taps (and the one-line error says how many sets fit)
    with pytest.raises(ValueError, match='only 1 stages that end before its final one. Use sets <= 2'):
        timm.create_model('sila_coat_tiny', num_classes=10, img_size=32)
    net = timm.create_model('sila_coat_tiny', num_classes=10, img_size=32, sila_sets=2)
    assert net.taps == ['serial_blocks1']
    assert net.stages[0].depth < net.stages[1].depth == net.stages[-1].depth  # found by hooking its blocks


def test_depth_by_stop_early_when_feature_info_names_no_modules():
    # HRNet's feature_info module names are not its modules; depths come from forward_intermediates(stop_early)
    net = timm.create_model('sila_hrnet_w18_small', num_classes=10)
    depths = [s.depth for s in net.stages]
    assert depths[0] == 1 and all(a < b for a, b in zip(depths, depths[1:])) and depths[-1] < net.total_depth
    assert net.taps == ['stage1', 'stem']
