"""The fast ConvPoolHead equals F.conv2d(3x3, padding 1) + global mean: values and gradients, every map shape."""
import pytest
import torch
import torch.nn.functional as F

import timm
from timm_sila import ConvPoolHead
from timm_sila.heads import create_head

# odd/even H, W, including the degenerate 1x1, 2x2, 1xW and Hx1 maps
SHAPES = [(1, 1), (2, 2), (1, 5), (6, 1), (3, 3), (4, 4), (5, 7), (8, 3), (7, 7), (14, 14)]


def _reference(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1).mean((2, 3))


def _head_and_input(h, w, dtype=torch.float32, in_chs=5, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = ConvPoolHead(in_chs, num_classes).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(head.bias.shape, generator=g, dtype=dtype))
    x = torch.randn(3, in_chs, h, w, generator=g, dtype=dtype)
    return head, x


def _grads(fn, x, head):
    x = x.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    out = fn(x)
    g_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    out.backward(g_out)
    return out.detach(), x.grad, head.weight.grad.clone(), head.bias.grad.clone()


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=['fp64', 'fp32'])
@pytest.mark.parametrize('h,w', SHAPES)
def test_fast_equals_conv_within_rounding(h, w, dtype, tol):
    head, x = _head_and_input(h, w, dtype)
    fast = _grads(head, x, head)
    ref = _grads(lambda t: _reference(t, head.weight, head.bias), x, head)
    for a, b, name in zip(fast, ref, ('output', 'grad input', 'grad weight', 'grad bias')):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f'{name} differs at {h}x{w} in {dtype}')


@pytest.mark.parametrize('h,w', [(1, 1), (2, 2), (5, 6), (7, 7)])
def test_channels_last_input(h, w):
    head, x = _head_and_input(h, w, torch.float64)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert x_cl.stride() != x.stride() or h * w == 1
    fast = _grads(head, x_cl, head)
    ref = _grads(lambda t: _reference(t, head.weight, head.bias), x, head)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert fast[1].is_contiguous(memory_format=torch.channels_last)  # the input gradient keeps the layout
    # a channels_last head (model.to(memory_format=channels_last)) gives the same result too
    head_cl = ConvPoolHead(x.shape[1], head.out_channels).to(torch.float64)
    head_cl.load_state_dict(head.state_dict())
    head_cl = head_cl.to(memory_format=torch.channels_last)
    torch.testing.assert_close(head_cl(x_cl), fast[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('h,w', [(1, 1), (2, 2), (4, 5), (7, 7)])
def test_bf16_autocast(h, w):
    head, x = _head_and_input(h, w, torch.float32, in_chs=16, num_classes=10)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = _grads(head, x, head)
        ref = _grads(lambda t: _reference(t, head.weight, head.bias), x, head)
    assert fast[0].dtype == ref[0].dtype == torch.bfloat16
    exact = _reference(x.double(), head.weight.double(), head.bias.double())
    scale = exact.abs().max().item()
    # both are bf16 approximations of the same exact value: each within a few bf16 ulps of the fp64 result
    for out in (fast[0], ref[0]):
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=0.03 * scale)
    for a, b in zip(fast[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())


def test_literal_form_is_the_conv():
    head, x = _head_and_input(5, 6, torch.float64)
    literal = create_head('conv3x3_literal', 5, 4).to(torch.float64)
    literal.load_state_dict(head.state_dict())
    assert literal.literal and not head.literal
    torch.testing.assert_close(literal(x), _reference(x, head.weight, head.bias), rtol=0, atol=0)
    torch.testing.assert_close(literal(x), head(x), rtol=1e-12, atol=1e-12)


def test_parameters_are_a_standard_conv2d():
    head = create_head('conv3x3', 8, 10)
    assert isinstance(head, torch.nn.Conv2d)
    assert head.weight.shape == (10, 8, 3, 3) and head.bias.shape == (10,)
    assert head.padding == (1, 1) and head.stride == (1, 1)
    conv = torch.nn.Conv2d(8, 10, 3, padding=1)
    conv.load_state_dict(head.state_dict())  # same keys and shapes as a plain Conv2d
    with pytest.raises(ValueError, match='Unknown head'):
        create_head('conv5x5', 8, 10)


@pytest.mark.parametrize('head_type', ['conv3x3', 'conv3x3_literal'])
def test_state_dict_keys_in_silanet(head_type):
    model = timm.create_model('sila_resnet18', num_classes=10, sila_head=head_type)
    keys = {k for k in model.state_dict() if k.startswith('heads.')}
    assert keys == {f'heads.{k}.{p}' for k in range(1, model.sets) for p in ('weight', 'bias')}
    # the two head types hold interchangeable checkpoints and give the same eval logits
    other = timm.create_model('sila_resnet18', num_classes=10,
                              sila_head='conv3x3_literal' if head_type == 'conv3x3' else 'conv3x3')
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval(), other.eval()
    with torch.no_grad():
        for k in range(model.sets):
            model.branch = other.branch = k
            torch.testing.assert_close(model(x), other(x), rtol=1e-4, atol=1e-5)
