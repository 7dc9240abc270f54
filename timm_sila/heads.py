"""Auxiliary heads (paper Sec 2.2): 3×3 conv (stride 1, padding 1) → global average pooling → N logits."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['ConvPoolHead', 'HEAD_TYPES', 'create_head']

HEAD_TYPES = ('conv3x3', 'conv3x3_literal')


class ConvPoolHead(nn.Conv2d):
    """mean_{h,w} conv3x3(x) for x of shape (B, C, H, W) → (B, N); parameters are a standard Conv2d's.

    The fast form uses that GAP∘conv3×3 is linear: out = b + W·S, where S[c, i, j] is the mean of x over rows
    R_i × cols C_j (R_0 = all rows but the last, R_1 = all, R_2 = all but the first; likewise columns), which
    needs only the total, first/last row and column sums and the corners. `literal=True` runs the conv.
    """

    def __init__(self, in_chs: int, num_classes: int, literal: bool = False):
        super().__init__(in_chs, num_classes, kernel_size=3, stride=1, padding=1)
        self.literal = literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:
            return F.conv2d(x, self.weight, self.bias, padding=1).mean((2, 3))
        return F.linear(shifted_window_means(x).flatten(1), self.weight.flatten(1), self.bias)


def shifted_window_means(x: torch.Tensor) -> torch.Tensor:
    """S (B, C, 3, 3): S[..., i, j] = mean over output positions of x shifted by (i-1, j-1), zero padded."""
    return _ShiftedWindowMeans.apply(x)


def _window_sums(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 3, 3) sums of x over rows R_i × cols C_j by inclusion-exclusion: S[i, j] = K[i, j] - row_i - col_j +
    total, where row_i / col_j is the sum of the row / column that offset i / j excludes (the last, none, the first)
    and K[i, j] the corner both exclude (0 where i or j = 1).

    Built from slices, sums and stacks only (no indexed writes), so torch.export / ONNX hold it as plain
    reductions; subtracting the zero rows and columns is exact, so every order of evaluation gives the same bits.
    """
    zero = x.new_zeros(x.shape[:2])
    rows = torch.stack([x[:, :, -1, :].sum(-1), zero, x[:, :, 0, :].sum(-1)], -1)  # (B, C, 3)
    cols = torch.stack([x[:, :, :, -1].sum(-1), zero, x[:, :, :, 0].sum(-1)], -1)
    corners = torch.stack([
        torch.stack([x[:, :, -1, -1], zero, x[:, :, -1, 0]], -1),
        torch.stack([zero, zero, zero], -1),
        torch.stack([x[:, :, 0, -1], zero, x[:, :, 0, 0]], -1),
    ], -2)  # (B, C, 3, 3)
    return corners.sub(rows[:, :, :, None]).sub(cols[:, :, None, :]).add(x.sum((2, 3))[:, :, None, None])


def _by_position_class(g: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Sum g over the windows i (size-3 `dim`) containing a position of class p = first, interior, last of n.

    R_0 = all but last, R_1 = all, R_2 = all but first: the first position is in R_0, R_1; an interior one in all;
    the last in R_1, R_2; the only position of n = 1 in R_1 alone.
    """
    g0, g1, g2 = g.unbind(dim)
    if n == 1:
        return torch.stack([g1, g1, g1], dim)
    return torch.stack([g0 + g1, g0 + g1 + g2, g1 + g2], dim)


class _ShiftedWindowMeans(torch.autograd.Function):
    """Forward: the (B, C, 3, 3) window means. Backward: dS/dx has only nine distinct values per (b, c) (first,
    interior, last row × column), so the input gradient is one full-size fill plus edge writes instead of
    autograd's full-size tensor per slice/sum."""

    @staticmethod
    def forward(ctx, x):
        h, w = x.shape[-2:]
        ctx.x_meta = (x.shape, x.dtype, x.device, _memory_format(x))
        return _window_sums(x).div(h * w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        shape, dtype, device, memory_format = ctx.x_meta
        h, w = shape[-2:]
        grad = grad.to(dtype) / (h * w)
        v = _by_position_class(_by_position_class(grad, 2, h), 3, w)  # (B, C, 3, 3): [row class, col class]
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        out.copy_(v[:, :, 1, 1, None, None].expand(shape))
        out[:, :, :, 0] = v[:, :, 1, 0, None]
        out[:, :, :, -1] = v[:, :, 1, 2, None]
        out[:, :, 0, :] = v[:, :, 0, 1, None]
        out[:, :, -1, :] = v[:, :, 2, 1, None]
        out[:, :, 0, 0] = v[:, :, 0, 0]
        out[:, :, 0, -1] = v[:, :, 0, 2]
        out[:, :, -1, 0] = v[:, :, 2, 0]
        out[:, :, -1, -1] = v[:, :, 2, 2]
        return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def create_head(head: str, in_chs: int, num_classes: int) -> ConvPoolHead:
    if head not in HEAD_TYPES:
        raise ValueError(f'Unknown head {head!r}; choose one of {HEAD_TYPES}.')
    return ConvPoolHead(in_chs, num_classes, literal=head == 'conv3x3_literal')
