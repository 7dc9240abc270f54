"""Branch sizes (paper Table 3): parameters, fp32 MB and compression ratio CR of each set's deployable model.

Set 0 is the base model; set k >= 1 is what `strip(net, k)` keeps: the backbone pruned after tap k plus head k.
CR = 1 - params(branch) / params(set 0); MB = params * 4 bytes / 2**20 ("Params size (MB)" as in torchsummary and
the paper). Stripped models are counted on the meta device (no memory, no init); an architecture timm cannot build
there is built for real, so a count is never guessed. A branch is `params=None` only when timm gives the base no
`prune_intermediate_layers`, i.e. it cannot be compressed.

Memory of a batch (`batch_memory`, `check_batch_fits`): before a command allocates a batch, the bytes it needs at
least -- the fp32 input batch plus the model's largest single activation for that batch, measured on the meta device
(shapes only, no memory) -- are compared with the memory available (`available_memory`: /proc/meminfo MemAvailable
within a cgroup limit, or free memory of a CUDA device). Both terms exist at once during a forward pass, so a batch
refused is one that cannot run; the estimate never refuses a batch that fits.
"""
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

import timm

from timm_sila.io.checkpoint import create_with_img_size
from timm_sila.config import sila_kwargs, sila_name
from timm_sila.model import SilaNet

__all__ = ['MB', 'GB', 'count_params', 'size_row', 'branch_sizes', 'model_info', 'MemoryBoundError', 'available_memory',
           'batch_memory', 'check_batch_fits']

MB = 2 ** 20  # bytes
GB = 10 ** 9  # bytes, as memory is reported to users


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


# --- memory of a batch ----------------------------------------------------------------------------------------
class MemoryBoundError(ValueError):
    """A batch that cannot fit in the memory available. `.needed` / `.available` are bytes, `.largest_batch` the
    largest batch size that fits (0: not even one sample). The message names the API arguments (`batch_size`,
    `img_size`); `.message(batch_option, size_option)` words it for another interface, e.g. a CLI's flags."""

    def __init__(self, template: str, needed: int, available: int, largest_batch: int):
        self.template = template  # with {batch} and {size} fields
        self.needed, self.available, self.largest_batch = needed, available, largest_batch
        super().__init__(self.message())

    def message(self, batch_option: str = 'batch_size', size_option: str = 'img_size') -> str:
        return self.template.replace('{batch}', batch_option).replace('{size}', size_option)


def _meminfo_available(path: str = '/proc/meminfo') -> Optional[int]:
    try:
        with open(path, 'rb') as f:
            for line in f.read(1 << 16).decode('ascii', 'replace').splitlines():
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_available(root: str = '/sys/fs/cgroup') -> Optional[int]:
    """Bytes left under this process's cgroup v2 memory limit, or None where there is none."""
    try:
        with open('/proc/self/cgroup', 'rb') as f:
            lines = f.read(1 << 16).decode('utf-8', 'replace').splitlines()
        rel = next((ln.split(':', 2)[2] for ln in lines if ln.startswith('0::')), '/')
        folder = os.path.join(root, rel.lstrip('/'))
        with open(os.path.join(folder, 'memory.max'), 'rb') as f:
            limit = f.read(64).decode('ascii').strip()
        if limit == 'max':
            return None
        with open(os.path.join(folder, 'memory.current'), 'rb') as f:
            current = int(f.read(64).decode('ascii').strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def available_memory(device: Union[str, torch.device, None] = None) -> Optional[int]:
    """Bytes a new allocation may use on `device` (default CPU), or None where this cannot be told.

    CPU: /proc/meminfo MemAvailable (else os.sysconf's available pages), within the cgroup v2 memory limit when one
    is set. CUDA: the device's free memory (torch.cuda.mem_get_info). Other devices: None.
    """
    device = torch.device(device if device is not None else 'cpu')
    if device.type == 'cuda':
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no CUDA runtime / not this device: nothing to compare with
            return None
    if device.type != 'cpu':
        return None
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def _largest_activation(model: nn.Module, input_size: Sequence[int]) -> int:
    """Bytes of the largest tensor any module of `model` outputs for one input of `input_size` (C, H, W), measured
    by an eval-mode forward pass on the meta device (shapes only; the model's weights and modes are left as they
    were); 0 where the model cannot run there."""
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        pending = [output]
        while pending:
            item = pending.pop()
            if isinstance(item, torch.Tensor):
                largest = max(largest, item.numel() * item.element_size())
            elif isinstance(item, (list, tuple)):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.values())

    tensors = {name: torch.empty_like(t, device='meta') for name, t in
               list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # inference: batch statistics of one sample are not needed
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.func.functional_call(model, tensors, (torch.empty(1, *input_size, device='meta'),), strict=False)
    except Exception:  # data-dependent code, tensors kept outside parameters and buffers: count the input only
        return 0
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return largest


def batch_memory(batch_size: int, input_size: Sequence[int], model: Optional[nn.Module] = None) -> Dict[str, int]:
    """Bytes a forward pass of `batch_size` fp32 inputs of `input_size` (C, H, W) needs at least: dict(input=the
    batch, activation=the largest single activation `model` computes for it (0 without a model, or where it cannot
    be measured), total, per_sample=total / batch_size)."""
    per_input = 4 * math.prod(int(s) for s in input_size)
    per_activation = _largest_activation(model, input_size) if model is not None else 0
    return dict(input=batch_size * per_input, activation=batch_size * per_activation,
                total=batch_size * (per_input + per_activation), per_sample=per_input + per_activation)


def _gb(n: int) -> str:
    return f'{n / GB:,.1f} GB' if n >= GB / 10 else f'{n / 2 ** 20:,.1f} MiB'


def check_batch_fits(batch_size: int, input_size: Sequence[int], model: Optional[nn.Module] = None,
                     device: Union[str, torch.device, None] = None, available: Optional[int] = None) -> Dict[str, int]:
    """`batch_memory(...)`, or MemoryBoundError (a ValueError) when it exceeds the memory `available` on `device`
    (default: `available_memory(device)`; where that cannot be told nothing is refused). The error says how much
    is needed and available and what to pass instead: a smaller batch size, or a smaller image size where one
    input alone does not fit."""
    need = batch_memory(batch_size, input_size, model)
    if available is None:
        available = available_memory(device)
    if available is None or need['total'] <= available:
        return need
    shape = 'x'.join(str(int(s)) for s in input_size)
    parts = f'{_gb(need["input"])} for the input batch'
    if need['activation']:
        parts += f' and {_gb(need["activation"])} for the model\'s largest activation'
    where = '' if device is None or torch.device(device).type == 'cpu' else f' on {device}'
    largest = available // need['per_sample']
    if largest < 1:
        one = f'{_gb(4 * math.prod(int(s) for s in input_size))} for the input'
        if need['activation'] // batch_size:
            one += f' and {_gb(need["activation"] // batch_size)} for the model\'s largest activation'
        template = (f'one input of {shape} needs at least {_gb(need["per_sample"])} ({one}); {_gb(available)} are '
                    f'available{where}: pass a smaller {{size}}')
    else:
        template = (f'a batch of {batch_size:,} inputs of {shape} needs at least {_gb(need["total"])} ({parts}); '
                    f'{_gb(available)} are available{where}: pass a smaller {{batch}} (at most {largest:,} could fit)')
    raise MemoryBoundError(template + '.', need['total'], available, largest)
