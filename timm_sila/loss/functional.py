"""The Sila loss as functions (paper Eq. 4, Fig. 1): one softmax over all M·N logits, weighted CE per label set.

Every option of torch's cross-entropy (`weight`, `ignore_index`, `reduction`, `label_smoothing`) keeps its exact
torch meaning: the Sila loss is torch's cross-entropy formula with `log_softmax(input)` replaced by the folded
Sila log-probabilities `sila_log_probs(logits)` (for plain (B, N) logits the two coincide).
"""
import numbers
from typing import List, Optional

import torch
import torch.nn.functional as F

from timm_sila._checks import finite_float, short
from timm_sila.config import check_set_weights

__all__ = ['sila_set_weights', 'sila_log_probs', 'sila_cross_entropy']

_REDUCTIONS = ('mean', 'sum', 'none')


def _finite(name: str, value) -> float:
    """`value` as a float, refusing booleans, strings, NaN and infinities."""
    number = finite_float(value)
    if number is None:
        raise ValueError(f'{name} must be a finite number, got {short(value)}.')
    return number


def check_smoothing(smoothing: float) -> float:
    smoothing = _finite('smoothing', smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f'smoothing must be in [0, 1), got {smoothing}.')
    return smoothing


def check_options(reduction: str, ignore_index: int) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f'ignore_index must be an integer class index (torch default -100), got {ignore_index!r}.')


def check_weight(weight: Optional[torch.Tensor], num_classes: int) -> None:
    if weight is None:
        return
    if not torch.is_tensor(weight) or not weight.is_floating_point() or tuple(weight.shape) != (num_classes,):
        got = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(
            f'weight must be a 1-D floating tensor of num_classes={num_classes} class weights (one per original '
            f'label, as for nn.CrossEntropyLoss; the Sila label sets reuse them), got {got}.')


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
    beta, decay = check_set_weights(beta, decay)
    return [1.0] + [beta * decay ** (j - 1) for j in range(1, sets)]


def sila_log_probs(logits: torch.Tensor, num_classes: int, beta: float = 0.1, decay: float = 0.5) -> torch.Tensor:
    """Fold (B, M·N) logits into (B, N) weighted log-probabilities.

    out[b, c] = Σ_j w_j · log softmax(logits[b])[c + j·N] with w = sila_set_weights(M, β, λ), computed with a
    single log-softmax over all M·N columns. Any loss of the form -Σ_c q_c · out[b, c] is the Sila loss for
    the (soft or one-hot) target distribution q. float16/bfloat16 logits are folded in float32 (as autocast
    runs softmax-based losses), so the loss does not depend on the path that reaches it.
    """
    if logits.ndim != 2:
        raise ValueError(f'Sila logits must be 2-D (batch, M·N), got shape {tuple(logits.shape)}.')
    sets = _num_sets(logits.shape[1], num_classes)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_p = F.log_softmax(logits, dim=-1)
    weights = torch.tensor(sila_set_weights(sets, beta, decay), dtype=log_p.dtype, device=log_p.device)
    # a weighted sum, not einsum: autocast would run einsum's matmul in bfloat16
    return (log_p.unflatten(1, (sets, num_classes)) * weights.view(1, sets, 1)).sum(1)


def _check_target(target: torch.Tensor, batch: int, num_classes: int, ignore_index: int) -> None:
    if target.is_floating_point():
        if target.ndim != 2 or target.shape[1] != num_classes or target.shape[0] != batch:
            raise ValueError(
                f'Soft targets must have shape (batch, num_classes) = ({batch}, {num_classes}), '
                f'got {tuple(target.shape)}.')
        if ignore_index >= 0:
            raise ValueError(f'ignore_index={ignore_index} is not supported with soft (probability) targets '
                             f'(as in torch): give class indices, or leave ignore_index at its default -100.')
        return
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(f'Class-index targets must have shape ({batch},), got {tuple(target.shape)}.')
    bad_mask = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if target.numel() and bool(bad_mask.any()):
        bad = target[bad_mask][:5].tolist()
        raise ValueError(
            f'Targets must be class indices in [0, {num_classes}) or ignore_index={ignore_index}; got {bad}. '
            f'Siamese label sets are added by the loss itself: pass the original labels.')


def _cross_entropy_of_log_probs(log_probs: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                                ignore_index: int, reduction: str, smoothing: float) -> torch.Tensor:
    """torch's cross-entropy formula (F.cross_entropy, every option) on given (B, N) log-probabilities.

    Class-index targets: per-sample loss w[t]·((1-ε)·(-lp[t]) - ε/N·Σ_c w_c·lp[c] / w[t]) with w ≡ 1 when
    `weight` is None, 0 for targets equal to `ignore_index`; 'mean' divides the sum by Σ w[t] over the kept
    samples (nan when none is kept, as torch). Soft targets q: -Σ_c w_c·q'_c·lp[c] with q' = (1-ε)q + ε/N;
    'mean' divides by the batch size.
    """
    n = log_probs.shape[1]
    if weight is not None:
        weight = weight.to(log_probs.dtype)
    if target.is_floating_point():
        q = target.to(log_probs.dtype)
        if smoothing:
            q = (1.0 - smoothing) * q + smoothing / n
        terms = q * log_probs if weight is None else q * log_probs * weight
        loss = -terms.sum(-1)
        return loss.mean() if reduction == 'mean' else loss.sum() if reduction == 'sum' else loss
    target = target.long()
    nll = F.nll_loss(log_probs, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    if not smoothing:
        return nll
    ignored = target == ignore_index
    smooth = -(log_probs if weight is None else log_probs * weight).sum(-1).masked_fill(ignored, 0.0)
    if reduction == 'mean':
        if weight is None:
            kept = (~ignored).sum()
        else:
            kept = weight.gather(0, target.masked_fill(ignored, 0)).masked_fill(ignored, 0.0).sum()
        smooth = smooth.sum() / kept
    elif reduction == 'sum':
        smooth = smooth.sum()
    return (1.0 - smoothing) * nll + (smoothing / n) * smooth


def sila_cross_entropy(
        logits: torch.Tensor,
        target: torch.Tensor,
        num_classes: int,
        beta: float = 0.1,
        decay: float = 0.5,
        smoothing: float = 0.0,
        reduction: str = 'mean',
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
) -> torch.Tensor:
    """Sila loss of (B, M·N) logits against (B,) class indices or (B, N) soft targets.

    loss_b = -Σ_j w_j Σ_c q_c log p(c + j·N), q = (1 - smoothing)·target + smoothing/N. `weight` (N,),
    `ignore_index` and `reduction` act exactly as in F.cross_entropy on the folded log-probabilities: a sample
    whose target is `ignore_index` contributes nothing and is not counted by 'mean'; with class weights the
    whole Sila term of sample b is scaled by weight[target_b] and 'mean' divides by Σ_b weight[target_b].
    'mean' over no kept sample (empty batch, all ignored) is nan, as in torch.
    """
    smoothing = check_smoothing(smoothing)
    check_options(reduction, ignore_index)
    check_weight(weight, num_classes)
    folded = sila_log_probs(logits, num_classes, beta, decay)
    _check_target(target, folded.shape[0], num_classes, ignore_index)
    return _cross_entropy_of_log_probs(folded, target, weight, int(ignore_index), reduction, smoothing)
