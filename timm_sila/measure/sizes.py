"""Branch sizes (paper Table 3): parameters, fp32 MB and compression ratio CR of each set's deployable model.

Set 0 is the base model; set k >= 1 is what `strip(net, k)` keeps: the backbone pruned after tap k plus head k.
CR = 1 - params(branch) / params(set 0); MB = params * 4 bytes / 2**20 ("Params size (MB)" as in torchsummary and
the paper). Stripped models are counted on the meta device (no memory, no init); an architecture timm cannot build
there is built for real, so a count is never guessed. A branch is `params=None` only when timm gives the base no
`prune_intermediate_layers`, i.e. it cannot be compressed.
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

import timm

from timm_sila.config import sila_kwargs, sila_name
from timm_sila.model import SilaNet, create_with_img_size

__all__ = ['MB', 'count_params', 'size_row', 'branch_sizes', 'model_info']

MB = 2 ** 20  # bytes


def count_params(model: nn.Module) -> int:
    """Parameters of `model`, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())


def size_row(branch: int, exit: str, params: Optional[int], base_params: Optional[int]) -> Dict[str, Any]:
    """{branch, exit, params, size_mb, cr}; size_mb / cr are None where params (or the base's) are unknown."""
    known = params is not None
    return dict(branch=branch, exit=exit, params=params, size_mb=params * 4 / MB if known else None,
                cr=1.0 - params / base_params if known and base_params else None)


def _build_for_counting(name: str, img_size: Optional[int], kwargs: Dict[str, Any]) -> nn.Module:
    """The model on the meta device, or built for real where its construction computes on tensors (e.g. .tolist());
    an error of the real build is the caller's. kwargs may hold img_size (a model's own `_model_args`)."""
    kwargs = dict(kwargs)
    img_size = kwargs.pop('img_size', img_size)
    try:
        with torch.device('meta'):
            return create_with_img_size(name, img_size, **kwargs)
    except Exception:
        return create_with_img_size(name, img_size, **kwargs)


def _counted(name: str, kwargs: Dict[str, Any]) -> int:
    return count_params(_build_for_counting(name, None, kwargs))


def branch_sizes(model: nn.Module) -> List[Dict[str, Any]]:
    """One `size_row` per branch `model` answers, in set order.

    SilaNet: every set (set k counted as the stripped branch-k model). Stripped SilaNet: its one branch (CR against
    the base architecture). Any other model: itself as branch 0.
    """
    if not isinstance(model, SilaNet):
        return [size_row(0, 'classifier', count_params(model), count_params(model))]
    if model.stripped:
        base = _counted(model.arch, model.base_args())
        return [size_row(model.branch, model.taps[model.branch - 1], count_params(model), base)]
    base = count_params(model.base)
    rows = [size_row(0, 'classifier', base, base)]
    prunable = callable(getattr(model.base, 'prune_intermediate_layers', None))
    for k in range(1, model.sets):
        kwargs = dict(model.base_args(), **dict(model.sila_args(), sila_branch=k, sila_stripped=True))
        params = _counted(sila_name(model.arch), kwargs) if prunable else None
        rows.append(size_row(k, model.taps[k - 1], params, base))
    return rows


def model_info(model: str, num_classes: int, img_size: Optional[int] = None, sets: Optional[int] = None,
               taps: Optional[Sequence[Union[int, str]]] = None, head: Optional[str] = None,
               **model_kwargs) -> Dict[str, Any]:
    """Table 3 for an architecture before training: `branch_sizes` of sila_<model> plus the training-time total."""
    name = sila_name(model)
    if not timm.is_model(name):
        raise ValueError(f'Unknown model {model!r}; see timm.list_models().')
    kwargs = dict(model_kwargs, num_classes=num_classes, **sila_kwargs(sets=sets, taps=taps or None, head=head))
    net = _build_for_counting(name, img_size, kwargs)
    train = count_params(net)
    return dict(model=name, arch=net.arch, num_classes=num_classes, img_size=img_size, sets=net.sets,
                taps=list(net.taps), head=net.head_type, branches=branch_sizes(net),
                train=dict(params=train, size_mb=train * 4 / MB),
                units='size_mb = params * 4 bytes (fp32) / 2**20; cr = 1 - params(branch) / params(branch 0)')
