"""Sila branches as early exits, routed per sample inside a batch.

Exits are tried from the shallowest tap (set M-1) to the deepest (set 1), then the base head (set 0).
A forward hook on each tap module scores the head's logits; samples whose confidence clears the exit's
threshold are answered there and are dropped from the hook's output, so the rest of the timm model's own
forward runs on the samples still in flight. No per-architecture segment code: construction verifies
that routing is exact for the model (tap outputs are the NCHW maps the heads read, and later layers only
see the hook's output) and refuses the model otherwise.
"""
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import SilaNet

__all__ = ['EarlyExit', 'ExitResult', 'calibrate_temperatures', 'simulate_exits', 'choose_threshold']

POLICIES = ('confidence', 'entropy')
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class ExitResult:
    """logits (B, N) in input order (answering set's logits / its temperature); exit_set (B,) the set that
    answered each sample (M-1 … 1 = auxiliary heads, 0 = base head); compute = executed backbone MACs divided
    by the MACs of the full model on the whole batch."""
    logits: torch.Tensor
    exit_set: torch.Tensor
    compute: float


class _AllExited(Exception):
    pass


def _score(logits: torch.Tensor, policy: str) -> torch.Tensor:
    """Higher is more certain: max softmax probability, or negative entropy."""
    if policy == 'confidence':
        return logits.softmax(-1).amax(-1)
    log_p = logits.log_softmax(-1)
    return (log_p.exp() * log_p).sum(-1)


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    k = math.prod(module.kernel_size)
    return out.numel() * (module.in_channels // module.groups) * k


class EarlyExit(nn.Module):
    """Early-exit inference over a SilaNet.

    thresholds: one per auxiliary set in exit order (set M-1 first … set 1), or one number for all; a sample
    exits when its score clears the threshold (policy 'confidence': max softmax prob >= t; 'entropy':
    entropy <= t). temperatures: one per set, indexed by set (0 … M-1), dividing that set's logits first.
    """

    def __init__(self, model: SilaNet, thresholds: Union[float, Sequence[float], None] = None,
                 policy: str = 'confidence', temperatures: Optional[Sequence[float]] = None):
        super().__init__()
        if not isinstance(model, SilaNet) or model.stripped:
            raise ValueError('EarlyExit needs a full (not stripped) SilaNet: every branch serves as an exit.')
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}.')
        self.model = model
        self.policy = policy
        self.exit_sets = list(range(model.sets - 1, 0, -1))  # shallowest tap first
        self.thresholds = self._check_thresholds(thresholds)
        temperatures = [1.0] * model.sets if temperatures is None else [float(t) for t in temperatures]
        if len(temperatures) != model.sets or any(not t > 0 for t in temperatures):
            raise ValueError(f'temperatures must be {model.sets} positive numbers (one per set), got {temperatures}.')
        self.temperatures = temperatures
        self._macs_per_sample: Dict[tuple, int] = {}
        self._verified: set = set()

    def _check_thresholds(self, thresholds) -> List[float]:
        n = len(self.exit_sets)
        if thresholds is None:
            return [math.inf if self.policy == 'confidence' else -math.inf] * n
        if isinstance(thresholds, (int, float)):
            return [float(thresholds)] * n
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != n:
            raise ValueError(f'thresholds must be one number or {n} (sets {self.exit_sets}), got {thresholds}.')
        return thresholds

    def set_thresholds(self, thresholds) -> None:
        self.thresholds = self._check_thresholds(thresholds)

    def config(self) -> dict:
        """JSON-serialisable exit configuration (policy, thresholds in exit order, temperatures by set)."""
        return dict(policy=self.policy, exit_sets=self.exit_sets, thresholds=self.thresholds,
                    temperatures=self.temperatures)

    # --- routing ------------------------------------------------------------------------------------
    def _tap_module(self, k: int) -> nn.Module:
        return self.model.base.get_submodule(self.model.taps[k - 1])

    def _route(self, x: torch.Tensor, force_keep: Optional[Dict[int, torch.Tensor]] = None):
        """Run the routed forward; returns (logits, exit_set, executed MACs)."""
        model, b = self.model, x.shape[0]
        out = None
        exit_set = torch.zeros(b, dtype=torch.long, device=x.device)
        active = torch.arange(b, device=x.device)
        macs = [0]
        handles = []

        def count(module, _, output):
            macs[0] += _layer_macs(module, output)

        def exit_hook(k):
            def hook(module, _, feat):
                nonlocal active, out
                if not torch.is_tensor(feat) or feat.ndim != 4 or feat.shape[1] != model.heads[str(k)].in_channels:
                    raise ValueError(f'Tap {model.taps[k - 1]!r} does not output an NCHW map for head {k}; '
                                     f'early exit cannot route this architecture.')
                logits = model.heads[str(k)](feat) / self.temperatures[k]
                if out is None:
                    out = logits.new_zeros(b, logits.shape[1])
                if force_keep is not None:
                    keep = force_keep[k][active]
                else:
                    score = _score(logits, self.policy)
                    t = self.thresholds[self.exit_sets.index(k)]
                    keep = score < t if self.policy == 'confidence' else -score > t
                leave = ~keep
                out[active[leave]] = logits[leave]
                exit_set[active[leave]] = k
                active = active[keep]
                if active.numel() == 0:
                    raise _AllExited
                return feat[keep]
            return hook

        for module in model.base.modules():
            if isinstance(module, _WEIGHT_LAYERS):
                handles.append(module.register_forward_hook(count))
        for k in self.exit_sets:
            handles.append(self._tap_module(k).register_forward_hook(exit_hook(k)))
        try:
            final = model.base(x)
            final = final / self.temperatures[0]
            if out is None:
                out = final.new_zeros(b, final.shape[1])
            out[active] = final
        except _AllExited:
            pass
        finally:
            for h in handles:
                h.remove()
        return out, exit_set, macs[0]

    def _full_macs(self, x: torch.Tensor) -> int:
        key = tuple(x.shape[1:])
        if key not in self._macs_per_sample:
            macs = [0]
            hooks = [m.register_forward_hook(lambda m, _, o: macs.__setitem__(0, macs[0] + _layer_macs(m, o)))
                     for m in self.model.base.modules() if isinstance(m, _WEIGHT_LAYERS)]
            try:
                self.model.base(x[:1])
            finally:
                for h in hooks:
                    h.remove()
            self._macs_per_sample[key] = macs[0]
        return self._macs_per_sample[key] * x.shape[0]

    @torch.no_grad()
    def segment_macs(self, x: torch.Tensor) -> List[int]:
        """Per-sample backbone MACs of each segment in exit order: input → shallowest tap, …, deepest tap →
        output (classifier included), counted over the conv/linear layers that run."""
        macs, marks = [0], {}
        hooks = [m.register_forward_hook(lambda m, _, o: macs.__setitem__(0, macs[0] + _layer_macs(m, o)))
                 for m in self.model.base.modules() if isinstance(m, _WEIGHT_LAYERS)]
        hooks += [self._tap_module(k).register_forward_hook(lambda *_, k=k: marks.__setitem__(k, macs[0]))
                  for k in self.exit_sets]
        try:
            self.model.base(x[:1])
        finally:
            for h in hooks:
                h.remove()
        cumulative = [marks[k] for k in self.exit_sets] + [macs[0]]
        return [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]

    @torch.no_grad()
    def verify(self, x: torch.Tensor) -> None:
        """Check that routing is exact for this model: with an arbitrary exit pattern, every sample still in
        flight gets the same base logits as in an unrouted forward, and every exit gets its head's logits."""
        key = tuple(x.shape[1:])
        if key in self._verified:
            return
        x = x[:1].expand(4, *x.shape[1:]).clone() + torch.randn(4, *x.shape[1:], generator=torch.Generator()
                                                                 .manual_seed(0)).to(x)
        reference = self.model.forward_branches(x)
        keep = {k: torch.ones(4, dtype=torch.bool, device=x.device) for k in self.exit_sets}
        keep[self.exit_sets[0]][1] = False  # sample 1 leaves at the first exit, the rest continue
        try:
            logits, exit_set, _ = self._route(x, force_keep=keep)
        except _AllExited:
            raise ValueError('internal: verification pattern exited every sample') from None
        except ValueError:
            raise
        except Exception as e:  # the model's own forward could not run on the reduced batch
            raise ValueError(f'{self.model.arch} cannot be routed per sample: its forward failed on a reduced batch '
                             f'after a tap ({type(e).__name__}: {e}). Use whole-batch inference for this model.') from e
        expected = torch.stack([reference[int(s)][i] / self.temperatures[int(s)] for i, s in enumerate(exit_set)])
        if exit_set.tolist() != [0, self.exit_sets[0], 0, 0] or not torch.allclose(logits, expected, rtol=1e-4,
                                                                                     atol=1e-4):
            raise ValueError(f'{self.model.arch} cannot be routed per sample: dropping samples at a tap changes the '
                             f'other samples\' outputs. Use whole-batch inference for this model.')
        self._verified.add(key)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> ExitResult:
        if self.model.training:
            raise ValueError('EarlyExit is for inference: call model.eval() first.')
        self.verify(x)
        full = self._full_macs(x)
        logits, exit_set, macs = self._route(x)
        return ExitResult(logits, exit_set, macs / full)

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """One .safetensors file: the SilaNet's weights, its sila_* arguments and this exit configuration."""
        import os
        import tempfile
        from safetensors.torch import save_file
        meta = dict(arch=self.model.arch, num_classes=self.model.num_classes,
                    model_args=dict(getattr(self.model, '_model_args', {}) or {}, **self.model.sila_args()),
                    early_exit=self.config())
        meta['model_args'].pop('num_classes', None)
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=os.path.dirname(path) or '.')
        os.close(fd)
        try:
            save_file(state, tmp, metadata={'timm_sila': json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path) -> 'EarlyExit':
        """Rebuild a saved EarlyExit (model in eval mode)."""
        import timm
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), 'pt') as f:
            raw = (f.metadata() or {}).get('timm_sila')
        if raw is None:
            raise ValueError(f'{path} has no timm_sila early-exit metadata; save it with EarlyExit.save().')
        meta = json.loads(raw)
        model = timm.create_model(f"sila_{meta['arch']}", num_classes=meta['num_classes'], **meta['model_args'])
        model.load_state_dict(load_file(str(path)))
        cfg = meta['early_exit']
        return cls(model.eval(), thresholds=cfg['thresholds'], policy=cfg['policy'],
                   temperatures=cfg['temperatures'])


# --- calibration on held-out data -----------------------------------------------------------------------
def calibrate_temperatures(branch_logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> List[float]:
    """Per-set temperature minimising NLL on held-out data. branch_logits: (n, M, N) in set order."""
    temps = []
    for k in range(branch_logits.shape[1]):
        logits = branch_logits[:, k].double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
        temps.append(float(log_t.detach().exp()))
    return temps


def simulate_exits(branch_logits: torch.Tensor, labels: torch.Tensor, thresholds: Sequence[float],
                   temperatures: Sequence[float], segment_macs: Sequence[int], policy: str = 'confidence') -> dict:
    """Offline exit decisions from cached branch logits (n, M, N).

    segment_macs: per-sample backbone MACs of each segment in exit order (input → shallowest tap, …,
    deepest tap → output). Returns accuracy (%), compute fraction and the exit-set histogram.
    """
    m = branch_logits.shape[1]
    exit_sets = list(range(m - 1, 0, -1))
    n = labels.shape[0]
    answered = torch.zeros(n, dtype=torch.bool)
    pred = torch.empty(n, dtype=torch.long)
    exit_set = torch.zeros(n, dtype=torch.long)
    macs = 0.0
    for j, k in enumerate(exit_sets):
        macs += segment_macs[j] * float((~answered).sum())
        logits = branch_logits[:, k] / temperatures[k]
        score = _score(logits, policy)
        leave = (score >= thresholds[j]) if policy == 'confidence' else (-score <= thresholds[j])
        leave &= ~answered
        pred[leave] = logits[leave].argmax(-1)
        exit_set[leave] = k
        answered |= leave
    macs += segment_macs[-1] * float((~answered).sum())
    pred[~answered] = branch_logits[~answered, 0].argmax(-1)
    return dict(accuracy=100.0 * float((pred == labels).float().mean()), compute=macs / (sum(segment_macs) * n),
                exits={k: int((exit_set == k).sum()) for k in [*exit_sets, 0]})


def choose_threshold(branch_logits, labels, temperatures, segment_macs, policy='confidence',
                     max_drop: Optional[float] = None, budget: Optional[float] = None,
                     candidates: int = 200) -> dict:
    """One threshold shared by all exits (after temperature scaling), chosen on held-out data:
    the least compute whose accuracy is within `max_drop` points of the base head's, or the best accuracy
    within a compute `budget` (fraction). Returns the chosen simulate_exits() row plus 'threshold'."""
    if (max_drop is None) == (budget is None):
        raise ValueError('Give exactly one of max_drop (accuracy points) or budget (compute fraction).')
    base_acc = 100.0 * float((branch_logits[:, 0].argmax(-1) == labels).float().mean())
    scores = torch.cat([_score(branch_logits[:, k] / temperatures[k], policy)
                        for k in range(1, branch_logits.shape[1])])
    grid = torch.quantile(scores.float(), torch.linspace(0, 1, candidates)).tolist()
    grid = sorted(set(grid + [max(grid) + 1e-6]))
    if policy == 'entropy':
        grid = [-g for g in grid]
    rows = []
    for t in grid:
        row = simulate_exits(branch_logits, labels, [t] * (branch_logits.shape[1] - 1), temperatures,
                             segment_macs, policy)
        rows.append(dict(row, threshold=t))
    if max_drop is not None:
        ok = [r for r in rows if r['accuracy'] >= base_acc - max_drop]
        best = min(ok, key=lambda r: (r['compute'], -r['accuracy']))
    else:
        ok = [r for r in rows if r['compute'] <= budget]
        if not ok:
            raise ValueError(f'No threshold reaches a compute budget of {budget}: the shallowest exit alone costs more.')
        best = max(ok, key=lambda r: (r['accuracy'], -r['compute']))
    return dict(best, base_accuracy=base_acc)
