"""`SilaLoss`: the Sila loss (paper Eq. 4) as an nn.Module criterion, with torch's cross-entropy options."""
from typing import Optional

import torch
import torch.nn as nn

from timm_sila.config import check_set_weights
from .functional import check_options, check_smoothing, check_weight, sila_cross_entropy
from .logits import SilaLogits

__all__ = ['SilaLoss']


class SilaLoss(nn.Module):
    """Sila loss (paper Eq. 4): CE(t) + Σ_{j=1}^{M-1} β·decay^(j-1)·CE(t + j·N) under one softmax over M·N.

    Input: logits (B, M·N) ordered [set 0 | set 1 | ... | set M-1]; M = width // num_classes.
    Target: (B,) class indices in [0, N) or (B, N) probabilities (Mixup/CutMix). `weight`, `ignore_index` and
    `reduction` as in nn.CrossEntropyLoss (see `sila_cross_entropy`); by default the batch mean.
    """

    def __init__(self, num_classes: int, beta: float = 0.1, decay: float = 0.5, smoothing: float = 0.0,
                 ignore_index: int = -100, weight: Optional[torch.Tensor] = None, reduction: str = 'mean'):
        super().__init__()
        beta, decay = check_set_weights(beta, decay)
        self.smoothing = check_smoothing(smoothing)
        check_options(reduction, ignore_index)
        check_weight(weight, int(num_classes))
        if weight is not None and not bool(torch.isfinite(weight).all()):
            raise ValueError(f'weight must hold finite numbers, got {weight.tolist()}.')
        self.num_classes = int(num_classes)
        self.beta = float(beta)
        self.decay = float(decay)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.register_buffer('weight', weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, SilaLogits):
            logits = logits.unwrap()
        return sila_cross_entropy(logits, target, self.num_classes, self.beta, self.decay, self.smoothing,
                                  reduction=self.reduction, weight=self.weight, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        extra = ''.join([f', ignore_index={self.ignore_index}' if self.ignore_index != -100 else '',
                         f", reduction='{self.reduction}'" if self.reduction != 'mean' else '',
                         ', weighted' if self.weight is not None else ''])
        return (f'num_classes={self.num_classes}, beta={self.beta}, decay={self.decay}, '
                f'smoothing={self.smoothing}{extra}')
