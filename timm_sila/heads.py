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
    h, w = x.shape[-2:]
    total = x.sum((2, 3))
    zero = torch.zeros_like(total)
    # rows/cols excluded by kernel offset i = 0, 1, 2: the last one, none, the first one
    rows_out = torch.stack([x[:, :, -1, :].sum(-1), zero, x[:, :, 0, :].sum(-1)], -1)
    cols_out = torch.stack([x[:, :, :, -1].sum(-1), zero, x[:, :, :, 0].sum(-1)], -1)
    corners = torch.stack([
        torch.stack([x[:, :, -1, -1], zero, x[:, :, -1, 0]], -1),
        torch.stack([zero, zero, zero], -1),
        torch.stack([x[:, :, 0, -1], zero, x[:, :, 0, 0]], -1),
    ], -2)
    s = total[:, :, None, None] - rows_out[:, :, :, None] - cols_out[:, :, None, :] + corners
    return s / (h * w)


def create_head(head: str, in_chs: int, num_classes: int) -> ConvPoolHead:
    if head not in HEAD_TYPES:
        raise ValueError(f'Unknown head {head!r}; choose one of {HEAD_TYPES}.')
    return ConvPoolHead(in_chs, num_classes, literal=head == 'conv3x3_literal')
