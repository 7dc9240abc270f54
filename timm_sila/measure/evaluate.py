"""Per-branch evaluation (paper Tables 2-3): top-1..5, loss, branch ensemble, params / MB / CR, in one pass.

`evaluate(model, loader) -> dict`; the command line's `timm-sila eval` prints it as a table.
"""
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_sila.model import SilaNet
from .sizes import branch_sizes

__all__ = ['evaluate']


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, maxk: int) -> torch.Tensor:
    """(maxk,) number of samples whose target is within the top-k predictions, k = 1..maxk."""
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = (pred == target[:, None]).float().cumsum(1).clamp_(max=1)
    return hit.sum(0)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        topk: int = 5,
        ensemble: bool = True,
        progress: bool = False,
        desc: str = 'eval',
        sizes: bool = True,
) -> Dict[str, Any]:
    """Evaluate every branch of `model` on `loader` ((images, targets) batches) in one pass.

    SilaNet (not stripped): all sets from one backbone pass per batch (`forward_branches`), plus the branch
    ensemble (mean of the sets' softmaxes). Any other model (stripped branch, plain timm model): one row.
    Returns dict(num_samples, topk, branches=[{branch, top1..topK (%), loss, params, size_mb, cr}, ...],
    ensemble={top1..topK, loss} or None). loss is the plain mean cross-entropy of that branch's (B, N) logits;
    the ensemble's loss is the NLL of the mean probability. The model is left in eval mode.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    model.eval()
    multi = isinstance(model, SilaNet) and not model.stripped
    n_seen = 0
    maxk = None
    correct: Optional[torch.Tensor] = None  # (branches [+ ensemble], maxk)
    loss_sum: Optional[torch.Tensor] = None
    batches = loader
    bar = None
    if progress:
        try:
            from tqdm import tqdm  # optional (the examples extra): the bar is shown only where it is installed
            bar = tqdm(loader, desc=desc, leave=False, total=len(loader) if hasattr(loader, '__len__') else None)
            batches = bar
        except ImportError:
            pass
    for images, target in batches:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        outs = model.forward_branches(images) if multi else [model(images)]
        outs = [o.float() for o in outs]
        if correct is None:
            num_classes = outs[0].shape[1]
            maxk = min(topk, num_classes)
            rows = len(outs) + (1 if multi and ensemble else 0)
            correct = torch.zeros(rows, maxk, dtype=torch.float64)
            loss_sum = torch.zeros(rows, dtype=torch.float64)
        hits = [_topk_correct(logits, target, maxk) for logits in outs]
        losses = [F.cross_entropy(logits, target, reduction='sum') for logits in outs]
        if multi and ensemble:
            probs = torch.stack([o.softmax(-1) for o in outs]).mean(0)
            hits.append(_topk_correct(probs, target, maxk))
            losses.append(F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction='sum'))
        # one copy to the host per batch (every row's counts and loss), not one per branch and statistic
        batch = torch.cat([torch.stack(hits).double(), torch.stack(losses).double()[:, None]], 1).cpu()
        correct += batch[:, :maxk]
        loss_sum += batch[:, maxk]
        n_seen += target.shape[0]
    if bar is not None:
        bar.close()
    if not n_seen:
        raise ValueError('evaluate() got an empty loader: no (images, targets) batch to evaluate.')

    def row(i):
        acc = (100.0 * correct[i] / n_seen).tolist()
        out = {f'top{k + 1}': acc[k] for k in range(maxk)}
        out['loss'] = float(loss_sum[i] / n_seen)
        return out

    size_rows = branch_sizes(model) if sizes else None
    branches = []
    n_branches = len(correct) - (1 if multi and ensemble else 0)
    for i in range(n_branches):
        entry = dict(branch=i if multi else getattr(model, 'branch', 0) if isinstance(model, SilaNet) else 0)
        entry.update(row(i))
        if size_rows is not None:
            entry.update({k: v for k, v in size_rows[i].items() if k != 'branch'})
        branches.append(entry)
    return dict(num_samples=n_seen, topk=maxk, branches=branches,
                ensemble=row(len(correct) - 1) if multi and ensemble else None)
