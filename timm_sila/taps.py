"""Stage discovery through timm's feature API and the paper's tap rule (Sec 2.2)."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.func import functional_call
from timm.models import get_model_input_config

from timm_sila.config import TAP_RULES
from ._timm_compat import built_by_timm

__all__ = ['Stage', 'probe_input_shape', 'probe_stages', 'choose_taps', 'resolve_taps']

_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class Stage:
    """One `feature_info` entry (stages are listed in feature_info order): its module name, the channels of its NCHW
    map and its weight-layer depth."""
    module: str
    channels: int
    depth: int


def _feature_entries(model: nn.Module) -> List[dict]:
    info = getattr(model, 'feature_info', None)
    if info is None or not len(info):
        raise ValueError(
            f'{type(model).__name__} has no feature_info, so SilaNet cannot find its stages. Only timm models that '
            f'support features_only / forward_intermediates can be used as a SilaNet base.')
    entries = list(info.info) if hasattr(info, 'info') else list(info)
    if not all(isinstance(e, dict) and 'module' in e for e in entries):
        raise ValueError(f'{type(model).__name__}.feature_info is not a list of stage dicts; cannot find stages.')
    if not hasattr(model, 'forward_intermediates'):
        raise ValueError(
            f'{type(model).__name__} has no forward_intermediates(); SilaNet reads stage features through it.')
    return entries


def probe_input_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) to probe with: timm's current input config (the size/channels the model was built for, e.g.
    `img_size=`); for a model timm did not build, its patch embedding's img_size, else its pretrained_cfg input."""
    if built_by_timm(model):  # timm records the current input config
        return tuple(int(v) for v in get_model_input_config(model)['input_size'])
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    chans, height, width = cfg.get('input_size', (3, 224, 224))
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != chans and not first.transposed:
        chans = first.in_channels
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return int(chans), int(height), int(width)


META_PROBE_MACS = 10e9  # above this estimate a real forward (~20 GMAC/s on one CPU core) costs more than the meta one


def estimated_macs(model: nn.Module, height: int, width: int) -> float:
    """Rough multiply-accumulates of one forward: each feature_info stage's parameters times the positions of its
    output map (exact for convolutions and token-wise linears; stages without a module name count 0)."""
    total = 0.0
    for entry in getattr(model, 'feature_info', None) or []:
        try:
            module = model.get_submodule(entry.get('module', ''))
        except AttributeError:
            continue
        if module is model:
            continue
        positions = height * width / max(int(entry.get('reduction') or 1), 1) ** 2
        total += sum(p.numel() for p in module.parameters()) * positions
    return total


def _probe_attempts(model: nn.Module) -> List[Tuple[str, Tuple[int, int, int]]]:
    """(how, (C, H, W)) to try in order; each that runs gives the same stages, the first is the cheapest.

    * 'small': a real forward at the final stage's reduction (its map is 1x1), for models timm says take any
      input size: tens of times cheaper than the full size;
    * 'meta': the full input on the meta device (shapes only, no arithmetic), for fixed-size models whose
      forward would cost more than META_PROBE_MACS (the meta device's own overhead is ~0.2-0.7 s);
    * 'full': a real forward at the full input.
    """
    chans, height, width = probe_input_shape(model)
    attempts = []
    if built_by_timm(model) and not get_model_input_config(model)['fixed_input_size']:
        side = max(int(model.feature_info[-1].get('reduction') or 0), 32)
        if side < min(height, width):
            attempts.append(('small', (chans, side, side)))
    if estimated_macs(model, height, width) > META_PROBE_MACS:
        attempts.append(('meta', (chans, height, width)))
    return attempts + [('full', (chans, height, width))]


class _Call(nn.Module):
    """Runs `fn(model, x)` as a forward, so torch.func.functional_call can swap the model's tensors for meta ones."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(self.model, x)


def _run(model: nn.Module, how: str, shape: Tuple[int, int, int], fn: Callable):
    """fn(model, x) on a batch-1 input of `shape`: real tensors, or the model's tensors replaced by meta ones."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if how != 'meta':
        device = param.device if param is not None else torch.device('cpu')
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0), device='cpu').to(device, dtype)
        return fn(model, x)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    meta = {f'model.{name}': torch.empty_like(t, device='meta') for name, t in tensors.items()}
    x = torch.empty(1, *shape, dtype=dtype, device='meta')
    return functional_call(_Call(model, fn), meta, (x,), strict=False)


@torch.no_grad()
def probe_stages(model: nn.Module) -> Tuple[List[Stage], int]:
    """Count the conv/linear layers one eval forward (batch 1) executes; the input is the cheapest that runs
    (`_probe_attempts`).

    Returns the stages in feature_info order, each with the depth (weight layers executed when its module
    returns) and the channels of the NCHW map `forward_intermediates` gives for it, and the depth D of the
    whole model including its classifier.
    """
    entries = _feature_entries(model)
    errors = []
    for how, shape in _probe_attempts(model):
        try:
            return _probe(model, entries, how, shape)
        except _StageError:
            raise
        except Exception as e:  # this input or device does not run: the next attempt is more general
            errors.append(f'{how} {shape}: {type(e).__name__}: {e}')
    raise ValueError(f'Cannot run {type(model).__name__}.forward_intermediates to find its stages: '
                     + '; '.join(errors))


class _StageError(ValueError):
    """The forward ran but its stages cannot serve as taps (a property of the model, not of the probe input)."""


def _probe(model: nn.Module, entries: List[dict], how: str, shape: Tuple[int, int, int]) -> Tuple[List[Stage], int]:
    count = [0]
    depths = {}
    counters, stage_hooks = [], []

    def count_layer(*_):
        count[0] += 1

    for module in model.modules():
        if isinstance(module, _WEIGHT_LAYERS):
            counters.append(module.register_forward_hook(count_layer))
    try:
        modules = [model.get_submodule(entry['module']) for entry in entries]
    except AttributeError:  # feature_info names are not real modules (e.g. HRNet's): measure with stop_early below
        modules = []
    for i, module in enumerate(modules):
        if module is model:
            continue  # module '' (e.g. TResNet's stem entry) is the model itself: measured with stop_early below
        # The stage's depth is the count when it last returns. Hooking its descendants too covers stages that are
        # containers the model iterates rather than calls (e.g. CoaT's `for blk in self.serial_blocks1`); for a
        # called stage its own hook fires after its descendants', so the result is the same.
        for sub in module.modules():
            stage_hooks.append(sub.register_forward_hook(lambda *_, i=i: depths.__setitem__(i, count[0])))

    def measure(m, x):
        final, intermediates = m.forward_intermediates(x)
        m.forward_head(final)
        total = count[0]
        for h in stage_hooks:
            h.remove()
        for i, entry in enumerate(entries):
            if i in depths or i >= len(intermediates):
                continue
            # No module to hook (or it never ran): the depth is what forward_intermediates runs to reach this stage
            # when it stops early.
            count[0] = 0
            m.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            depths[i] = count[0]
        return total, [tuple(f.shape) for f in intermediates]

    was_training = model.training
    model.eval()
    try:
        total, shapes = _run(model, how, shape, measure)
    finally:
        model.train(was_training)
        for h in counters + stage_hooks:
            h.remove()

    if len(shapes) != len(entries):
        raise _StageError(
            f'{type(model).__name__}.forward_intermediates() returned {len(shapes)} features but its '
            f'feature_info lists {len(entries)} stages; cannot map taps to features.')
    stages = []
    for i, (entry, feat) in enumerate(zip(entries, shapes)):
        if len(feat) != 4:
            raise _StageError(f"Stage {i} ({entry['module']}) gives a {len(feat)}-D feature, not an NCHW map.")
        if i not in depths:
            raise _StageError(f"Stage {i} ({entry['module']}) never ran in {type(model).__name__}'s forward.")
        stages.append(Stage(entry['module'], int(feat[1]), depths[i]))
    return stages, total


def choose_taps(stages: Sequence[Stage], total_depth: int, sets: int, rule: str = 'depth') -> List[int]:
    """Tap stage indices in set order (set 1 deepest) by a named rule:

    * 'depth' (paper Sec 2.2, the default): set k (1..M-1) taps the stage whose depth is nearest D·(M-k)/M,
      ties to the deeper one;
    * 'stages' (the layout of the paper's Table 3 models): the M-1 stages right before the final one.

    Taps are strictly decreasing in depth order and never the final stage nor a stage that ends as deep as it
    (e.g. CoaT's parallel blocks or HRNet's fused branches give several feature_info stages at once; an exit there
    would run the whole backbone and save nothing).
    """
    if rule not in TAP_RULES:
        raise ValueError(f'Unknown tap rule {rule!r}; use one of {list(TAP_RULES)} or a list of stages.')
    usable = 0  # stages 0..usable-1 end before the final stage
    while usable < len(stages) - 1 and stages[usable].depth < stages[-1].depth:
        usable += 1
    if sets - 1 > usable:
        raise ValueError(f'sets={sets} needs {sets - 1} tap stages, but the model has only {usable} stages that end '
                         f'before its final one. Use sets <= {usable + 1}.')
    if rule == 'stages':
        return [usable - k for k in range(1, sets)]
    taps, upper = [], usable
    for k in range(1, sets):
        target = total_depth * (sets - k) / sets
        lower = sets - 1 - k  # leave one stage for each shallower set
        best = min(range(lower, upper), key=lambda i: (abs(stages[i].depth - target), -i))
        taps.append(best)
        upper = best
    return taps


def resolve_taps(taps: Optional[Sequence[Union[int, str]]], stages: Sequence[Stage], sets: int) -> List[int]:
    """Validate user taps (module names or feature_info indices, set order, deepest first) → stage indices."""
    if isinstance(taps, (str, int)):
        taps = [taps]
    taps = list(taps)
    names = [s.module for s in stages]
    if len(taps) != sets - 1:
        raise ValueError(f'taps must list {sets - 1} stages (one per auxiliary set, deepest first), got {taps}.')
    out = []
    for t in taps:
        if isinstance(t, str):
            if t not in names:
                raise ValueError(f'Tap {t!r} is not a stage of this model; stages are {names}.')
            if names.count(t) > 1:
                where = [i for i, n in enumerate(names) if n == t]
                raise ValueError(f'Tap {t!r} names {len(where)} stages of this model (feature_info indices {where}); '
                                 f'pass the feature_info index instead of the name.')
            out.append(names.index(t))
        elif isinstance(t, int) and not isinstance(t, bool):
            if not -len(stages) <= t < len(stages):
                raise ValueError(f'Tap index {t} is out of range for {len(stages)} stages {names}.')
            out.append(t % len(stages))
        else:
            raise ValueError(f'Taps must be module names or feature_info indices, got {t!r}.')
    if out and out[0] == len(stages) - 1:
        raise ValueError(f'Tap {names[out[0]]!r} is the final stage, which set 0 already uses; tap an earlier one.')
    if any(a <= b for a, b in zip(out, out[1:])):
        raise ValueError(f'Taps must be strictly ordered deepest first (set 1 = deepest), got '
                         f'{[names[i] for i in out]}.')
    return out
