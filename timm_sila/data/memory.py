"""Whether a batch fits in memory, checked before a command allocates it (eval, exit-curve, bench, export).

`batch_memory` counts the bytes a forward pass needs at least: the fp32 input batch plus the model's largest single
activation for that batch, measured on the meta device (shapes only, no memory). `check_batch_fits` compares that
with the memory available (`available_memory`: /proc/meminfo MemAvailable within a cgroup limit, or the free memory
of a CUDA device) and raises `MemoryBoundError` (a ValueError) saying what to pass instead. Both terms exist at once
during a forward pass, so a batch refused is one that cannot run; the estimate never refuses a batch that fits.
"""
import math
import os
import warnings
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ['GB', 'MemoryBoundError', 'available_memory', 'batch_memory', 'check_batch_fits']

GB = 10 ** 9  # bytes, as memory is reported to users


class MemoryBoundError(ValueError):
    """A batch that cannot fit in the memory available. `.needed` / `.available` are bytes, `.largest_batch` the
    largest batch size that fits (0: not even one sample). The message names the API arguments (`batch_size`,
    `img_size`); `.message(batch_size=..., img_size=...)` words it for another interface, e.g. a CLI's flags."""

    def __init__(self, template: str, needed: int, available: int, largest_batch: int):
        self.template = template  # with {batch} and {size} fields
        self.needed, self.available, self.largest_batch = needed, available, largest_batch
        super().__init__(self.message())

    def message(self, batch_size: str = 'batch_size', img_size: str = 'img_size', **other_names: str) -> str:
        return self.template.replace('{batch}', batch_size).replace('{size}', img_size)


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
