"""The one MAC counter: torch's FlopCounterMode (convolutions, linear layers and attention matmuls alike), with
the running total read where chosen modules return, so a forward splits into segments."""
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

__all__ = ['segment_macs']

# torch counts the CUDA attention kernels; on the CPU, F.scaled_dot_product_attention runs this one (same maths)
_CPU_SDPA = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
if _CPU_SDPA is not None and _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def segment_macs(model: nn.Module, x: torch.Tensor, boundaries: Sequence[nn.Module]) -> List[int]:
    """Per-sample MACs of `model(x[:1])` split at `boundaries` (modules in execution order): [input -> boundary 0,
    ..., last boundary -> output]; len(boundaries) + 1 entries summing to the whole forward's MACs."""
    marks = {}
    with FlopCounterMode(display=False) as counter:
        hooks = [m.register_forward_hook(lambda *_, i=i: marks.__setitem__(i, counter.get_total_flops()))
                 for i, m in enumerate(boundaries)]
        try:
            model(x[:1])
        finally:
            for h in hooks:
                h.remove()
        total = counter.get_total_flops()
    missing = [i for i in range(len(boundaries)) if i not in marks]
    if missing:
        raise ValueError(f'Boundary modules {missing} never ran in {type(model).__name__}\'s forward.')
    cumulative = [marks[i] for i in range(len(boundaries))] + [total]
    return [(b - a) // 2 for a, b in zip([0] + cumulative[:-1], cumulative)]  # a MAC is 2 FLOPs
