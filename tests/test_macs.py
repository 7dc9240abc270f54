"""The one MAC counter (timm_sila.exits.macs): exact for CNNs against a hand count, and it counts attention matmuls."""
import math

import pytest
import torch
import torch.nn as nn

import timm
from timm_sila.exits.macs import segment_macs


def _hand_count(model, x, boundaries):
    """conv/linear MACs of model(x[:1]) from each layer's output size, split where `boundaries` return."""
    total, marks = [0], {}

    def count(module, _, out):
        if isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        else:
            total[0] += out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks += [b.register_forward_hook(lambda *_, i=i: marks.__setitem__(i, total[0])) for i, b in enumerate(boundaries)]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    cumulative = [marks[i] for i in range(len(boundaries))] + [total[0]]
    return [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]


@pytest.mark.parametrize('arch', ['resnet18', 'test_efficientnet'])
def test_cnn_segments_equal_the_hand_count(arch):
    model = timm.create_model(arch, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    stages = [model.get_submodule(info['module']) for info in model.feature_info][1:3]
    got = segment_macs(model, x, stages)
    assert got == _hand_count(model, x, stages)
    assert len(got) == 3 and all(m > 0 for m in got)


def test_attention_matmuls_are_counted():
    model = timm.create_model('test_vit', num_classes=10).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg['input_size'][1:])
    (total,) = segment_macs(model, x, [])
    (layers_only,) = _hand_count(model, x, [])
    block = model.blocks[0]
    tokens, dim = model.patch_embed.num_patches + model.num_prefix_tokens, block.attn.qkv.in_features
    assert total - layers_only == len(model.blocks) * 2 * tokens * tokens * dim  # q·kᵀ and attn·v per block


def test_a_boundary_that_never_runs_is_an_error():
    model = timm.create_model('resnet18', num_classes=10).eval()
    with pytest.raises(ValueError, match='never ran'):
        segment_macs(model, torch.randn(1, 3, 32, 32), [nn.Conv2d(1, 1, 1)])
