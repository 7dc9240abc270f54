"""The Sila loss (paper Eq. 4, Fig. 1): one softmax over all M·N logits, weighted CE per label set."""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['SilaLoss', 'sila_set_weights', 'sila_log_probs', 'sila_cross_entropy']


def _check_hparams(beta: float, decay: float) -> None:
    if beta < 0 or decay < 0:
        raise ValueError(f'Sila loss needs beta >= 0 and decay >= 0, got beta={beta}, decay={decay}.')


def _num_sets(width: int, num_classes: int) -> int:
    if num_classes < 1:
        raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
    if width % num_classes:
        raise ValueError(
            f'Sila logits have width {width}, which is not a multiple of num_classes={num_classes}: '
            f'expected M·N columns ordered [set 0 | set 1 | ...]. Check num_classes.')
    sets = width // num_classes
    if sets < 2:
        raise ValueError(
            f'Sila logits need M >= 2 label sets, got width {width} = {sets} x {num_classes}: this looks like a '
            f'plain classifier output. Train with SilaNet (train mode) or use a plain cross-entropy.')
    return sets


def sila_set_weights(sets: int, beta: float, decay: float) -> List[float]:
    """Weight of each label set: [1, β, β·λ, β·λ², ...] (length `sets`)."""
    _check_hparams(beta, decay)
    return [1.0] + [beta * decay ** (j - 1) for j in range(1, sets)]


def sila_log_probs(logits: torch.Tensor, num_classes: int, beta: float = 0.1, decay: float = 0.5) -> torch.Tensor:
    """Fold (B, M·N) logits into (B, N) weighted log-probabilities.

    out[b, c] = Σ_j w_j · log softmax(logits[b])[c + j·N] with w = sila_set_weights(M, β, λ), computed with a
    single log-softmax over all M·N columns. Any loss of the form -Σ_c q_c · out[b, c] is the Sila loss for
    the (soft or one-hot) target distribution q.
    """
    if logits.ndim != 2:
        raise ValueError(f'Sila logits must be 2-D (batch, M·N), got shape {tuple(logits.shape)}.')
    sets = _num_sets(logits.shape[1], num_classes)
    log_p = F.log_softmax(logits, dim=-1)
    weights = torch.tensor(sila_set_weights(sets, beta, decay), dtype=log_p.dtype, device=log_p.device)
    return torch.einsum('bmn,m->bn', log_p.unflatten(1, (sets, num_classes)), weights)


def _check_target(target: torch.Tensor, batch: int, num_classes: int) -> None:
    if target.is_floating_point():
        if target.ndim != 2 or target.shape[1] != num_classes or target.shape[0] != batch:
            raise ValueError(
                f'Soft targets must have shape (batch, num_classes) = ({batch}, {num_classes}), '
                f'got {tuple(target.shape)}.')
        return
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(f'Class-index targets must have shape ({batch},), got {tuple(target.shape)}.')
    if target.numel() and bool(((target < 0) | (target >= num_classes)).any()):
        bad = target[(target < 0) | (target >= num_classes)][:5].tolist()
        raise ValueError(
            f'Targets must be class indices in [0, {num_classes}); got {bad}. Siamese label sets are added by '
            f'the loss itself: pass the original labels.')


def sila_cross_entropy(
        logits: torch.Tensor,
        target: torch.Tensor,
        num_classes: int,
        beta: float = 0.1,
        decay: float = 0.5,
        smoothing: float = 0.0,
        reduction: str = 'mean',
) -> torch.Tensor:
    """Sila loss of (B, M·N) logits against (B,) class indices or (B, N) soft targets.

    loss_b = -Σ_j w_j Σ_c q_c log p(c + j·N), q = (1 - smoothing)·target + smoothing/N.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f'smoothing must be in [0, 1), got {smoothing}.')
    if reduction not in ('mean', 'sum', 'none'):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    folded = sila_log_probs(logits, num_classes, beta, decay)
    _check_target(target, folded.shape[0], num_classes)
    if target.is_floating_point():
        loss = -(target.to(folded.dtype) * folded).sum(-1)
        if smoothing:
            loss = (1.0 - smoothing) * loss - smoothing * folded.mean(-1)
    else:
        loss = -folded.gather(1, target.long().unsqueeze(1)).squeeze(1)
        if smoothing:
            loss = (1.0 - smoothing) * loss - smoothing * folded.mean(-1)
    if reduction == 'mean':
        return loss.mean()
    if reduction == 'sum':
        return loss.sum()
    return loss


class SilaLoss(nn.Module):
    """Sila loss (paper Eq. 4): CE(t) + Σ_{j=1}^{M-1} β·decay^(j-1)·CE(t + j·N) under one softmax over M·N.

    Input: logits (B, M·N) ordered [set 0 | set 1 | ... | set M-1]; M = width // num_classes.
    Target: (B,) class indices in [0, N) or (B, N) probabilities (Mixup/CutMix). Returns the batch mean.
    """

    def __init__(self, num_classes: int, beta: float = 0.1, decay: float = 0.5, smoothing: float = 0.0):
        super().__init__()
        _check_hparams(beta, decay)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1), got {smoothing}.')
        self.num_classes = int(num_classes)
        self.beta = float(beta)
        self.decay = float(decay)
        self.smoothing = float(smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .logits import SilaLogits
        if isinstance(logits, SilaLogits):
            logits = logits.unwrap()
        return sila_cross_entropy(logits, target, self.num_classes, self.beta, self.decay, self.smoothing)

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, beta={self.beta}, decay={self.decay}, smoothing={self.smoothing}'
