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
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import SilaNet
from .timm_compat import model_args as timm_model_args

__all__ = ['EarlyExit', 'ExitResult', 'calibrate_temperatures', 'simulate_exits', 'choose_threshold',
           'choose_thresholds', 'TEMPERATURE_BOUNDS']

POLICIES = ('confidence', 'entropy')
_NEVER = {'confidence': 2.0, 'entropy': -1.0}  # thresholds no score clears: max prob <= 1, entropy >= 0
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class ExitResult:
    """logits (B, N) in input order (answering set's logits / its temperature); exit_set (B,) the set that
    answered each sample (M-1 … 1 = auxiliary heads, 0 = base head); compute = executed backbone MACs divided
    by the MACs of the full model on the whole batch (nan for an empty batch, whose outputs are empty)."""
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


def _finite_numbers(value, what: str) -> Union[float, List[float]]:
    """A number, or a sequence of numbers, as floats. Python, numpy and 0-d/1-d tensor numbers are accepted;
    booleans, strings, NaN and infinities are refused with ValueError."""
    def one(v):
        if hasattr(v, 'tolist') and not isinstance(v, (list, tuple)):  # numpy scalar / array, tensor
            v = v.tolist()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f'{what} must be finite numbers, got {value!r}.')
        return float(v)
    if hasattr(value, 'tolist') and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [one(v) for v in value]
    return one(value)


class EarlyExit(nn.Module):
    """Early-exit inference over a SilaNet.

    thresholds: one per auxiliary set in exit order (set M-1 first … set 1), or one number for all; a sample
    exits when its score clears the threshold (policy 'confidence': max softmax prob >= t; 'entropy':
    entropy <= t). None: no sample exits (stored as 2.0 for 'confidence', -1.0 for 'entropy', scores no sample
    reaches). temperatures: one per set, indexed by set (0 … M-1), dividing that set's logits first. Every value
    must be a finite number (Python, numpy or 0-d tensor); temperatures > 0.

    Construction checks that per-sample routing is exact for the model (a routed forward on `input_size`, default
    the model's own input size, is compared with an unrouted one) and refuses models it cannot route (e.g. ViT
    token taps) with ValueError. A forward on another input size repeats the check once for that size.
    """

    def __init__(self, model: SilaNet, thresholds: Union[float, Sequence[float], None] = None,
                 policy: str = 'confidence', temperatures: Optional[Sequence[float]] = None,
                 input_size: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(model, SilaNet) or model.stripped:
            raise ValueError('EarlyExit needs a full (not stripped) SilaNet: every branch serves as an exit.')
        if policy not in POLICIES:
            raise ValueError(f'policy must be one of {POLICIES}, got {policy!r}.')
        self.model = model
        self.policy = policy
        self.exit_sets = list(range(model.sets - 1, 0, -1))  # shallowest tap first
        self.thresholds = self._check_thresholds(thresholds)
        temperatures = [1.0] * model.sets if temperatures is None else _finite_numbers(temperatures, 'temperatures')
        if not isinstance(temperatures, list) or len(temperatures) != model.sets or any(t <= 0 for t in temperatures):
            raise ValueError(f'temperatures must be {model.sets} positive numbers (one per set), got {temperatures}.')
        self.temperatures = temperatures
        self._macs_per_sample: Dict[tuple, int] = {}
        self._verified: set = set()
        self._verify_model(input_size)

    def _verify_model(self, input_size: Optional[Sequence[int]]) -> None:
        from .taps import probe_input_shape
        shape = tuple(int(v) for v in (input_size or probe_input_shape(self.model.base)))
        param = next(self.model.parameters())
        x = torch.zeros(1, *shape, device=param.device, dtype=param.dtype)
        was_training = self.model.training
        self.model.eval()  # the check must not update batch-norm statistics
        try:
            self.verify(x)
        finally:
            self.model.train(was_training)

    def _check_thresholds(self, thresholds) -> List[float]:
        n = len(self.exit_sets)
        if thresholds is None:
            return [_NEVER[self.policy]] * n
        thresholds = _finite_numbers(thresholds, 'thresholds')
        if not isinstance(thresholds, list):
            return [thresholds] * n
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
                                     f'early exit cannot route this architecture; use one branch per batch '
                                     f'(model.branch = k) instead.')
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
        if x.shape[0] == 0:  # nothing to route; compute is 0 of 0 MACs (nan, as torch's mean of nothing)
            return ExitResult(x.new_zeros(0, self.model.num_classes), torch.zeros(0, dtype=torch.long,
                                                                                  device=x.device), math.nan)
        self.verify(x)
        full = self._full_macs(x)
        logits, exit_set, macs = self._route(x)
        return ExitResult(logits, exit_set, macs / full)

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """One .safetensors file: the SilaNet's weights, its sila_* and architecture arguments and this exit
        configuration, written atomically (the previous file stays whole if the write fails). Refuses (ValueError)
        a model built with arguments an EarlyExit file may not carry (see `timm_sila.config.FILE_MODEL_KWARGS`),
        so that every saved file loads."""
        from safetensors.torch import save_file
        from .atomic import atomic_write_file
        from .config import UnsafeFileError, sanitize_file_model_kwargs
        model_args = dict(timm_model_args(self.model), **self.model.sila_args())
        model_args.pop('num_classes', None)
        try:
            sanitize_file_model_kwargs(model_args, path)
        except UnsafeFileError as e:
            raise ValueError(f'Cannot save {path}: the model was built with {e.key}={model_args.get(e.key)!r}, which '
                             f'an EarlyExit file may not carry (EarlyExit.load would refuse it). Build the model '
                             f'without it.') from None
        meta = dict(arch=self.model.arch, num_classes=self.model.num_classes, model_args=model_args,
                    early_exit=self.config())
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_file(path, lambda tmp: save_file(state, str(tmp), metadata={'timm_sila': json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> 'EarlyExit':
        """Rebuild a saved EarlyExit (model in eval mode).

        The file may choose weights, never code, URLs, paths or downloads: its model arguments pass the allow-list
        of `timm_sila.config.sanitize_file_model_kwargs`, the architecture must be a registered name, tensors must
        match the model (no silent dtype cast) and the exit configuration must be finite. Anything else raises one
        `CheckpointError` (a ValueError) naming the file; loading performs no network access and writes nothing.
        """
        import timm
        from .checkpoint import load_state_dict_checked, read_safetensors
        from .config import CheckpointError, check_file_architecture, sanitize_file_model_kwargs
        tensors, metadata = read_safetensors(path)
        raw = metadata.get('timm_sila')
        if raw is None:
            raise CheckpointError(f'{path} has no timm_sila early-exit metadata; save it with EarlyExit.save().')
        try:
            meta = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError as e:
            raise CheckpointError(f'{path}: its early-exit metadata is not JSON of finite numbers ({e}).') from None
        cfg = meta.get('early_exit') if isinstance(meta, dict) else None
        num_classes = meta.get('num_classes') if isinstance(meta, dict) else None
        if (not isinstance(cfg, dict) or not isinstance(meta.get('arch'), str) or isinstance(num_classes, bool)
                or not isinstance(num_classes, int) or num_classes < 1
                or not {'policy', 'thresholds', 'temperatures'} <= set(cfg)):
            raise CheckpointError(f'{path}: its early-exit metadata lacks arch (a name), num_classes (an integer '
                                  f'>= 1) or early_exit (policy, thresholds, temperatures); save it with '
                                  f'EarlyExit.save().')
        name = check_file_architecture(f'sila_{check_file_architecture(meta["arch"], path)}', path)
        kwargs = sanitize_file_model_kwargs(meta.get('model_args'), path, overridden=('num_classes',))
        try:
            model = timm.create_model(name, num_classes=num_classes, **kwargs)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f'{path}: cannot rebuild {name} from its model arguments {kwargs}: {e}') from None
        load_state_dict_checked(model, tensors, path, what=name)
        try:
            return cls(model.eval(), thresholds=cfg['thresholds'], policy=cfg['policy'],
                       temperatures=cfg['temperatures'])
        except ValueError as e:
            raise CheckpointError(f'{path}: invalid early-exit configuration: {e}') from None


def _refuse_constant(name: str):
    raise ValueError(f'{name} is not a number a file may give')


# --- calibration on held-out data -----------------------------------------------------------------------
TEMPERATURE_BOUNDS = (0.05, 20.0)


def calibrate_temperatures(branch_logits: torch.Tensor, labels: torch.Tensor, steps: int = 100,
                           bounds: Sequence[float] = TEMPERATURE_BOUNDS) -> List[float]:
    """Per-set temperature minimising NLL on held-out data, within `bounds`. branch_logits: (n, M, N) in set order.

    The NLL is convex in 1/T, so clamping the free fit to `bounds` gives the best temperature within them. A fit
    outside them is clamped with a UserWarning: T > 20 means the set's logits carry almost no confidence
    information (typically an untrained or collapsed head, whose free fit runs off to thousands), T < 0.05 that
    they are compressed 20-fold; either way thresholds on such scores would mean little.
    """
    if branch_logits.ndim != 3 or branch_logits.shape[0] == 0 or labels.shape != branch_logits.shape[:1]:
        raise ValueError(f'Temperature calibration needs (n, M, N) logits with n >= 1 and (n,) labels, got '
                         f'{tuple(branch_logits.shape)} and {tuple(labels.shape)}: is the calibration set empty?')
    low, high = bounds
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
        fitted = float(log_t.detach().exp())
        if math.isnan(fitted):
            raise ValueError(f'Temperature calibration of set {k} failed: its logits are not finite.')
        t = min(max(fitted, low), high)
        if t != fitted:
            warnings.warn(f'set {k}: fitted temperature {fitted:.4g} is outside [{low}, {high}] (its logits carry '
                          f'{"almost no" if fitted > high else "compressed"} confidence information, e.g. an '
                          f'untrained head); using {t}.', UserWarning, stacklevel=2)
        temps.append(t)
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
    limit = max_drop if budget is None else budget
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not math.isfinite(limit) or limit < 0:
        raise ValueError(f'max_drop / budget must be a finite number >= 0, got {limit!r}.')
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


def choose_thresholds(branch_logits, labels, temperatures, segment_macs, policy='confidence', max_drop: float = 1.0,
                      candidates: int = 50, rounds: int = 4) -> dict:
    """One threshold per exit (exit order, as EarlyExit takes them), chosen on held-out data: the least compute
    whose accuracy is within `max_drop` points of the base head's.

    Starts from the shared threshold of `choose_threshold` and improves one exit at a time (coordinate descent over
    `candidates` quantiles of that exit's scores, plus "never exit"), for up to `rounds` passes; a change is kept
    only if it lowers compute within the accuracy constraint, so the result never costs more than the shared one.
    Returns the chosen simulate_exits() row plus 'thresholds' and 'base_accuracy'."""
    shared = choose_threshold(branch_logits, labels, temperatures, segment_macs, policy, max_drop=max_drop)
    base_acc, floor = shared['base_accuracy'], shared['base_accuracy'] - max_drop
    exit_sets = list(range(branch_logits.shape[1] - 1, 0, -1))
    sign = -1.0 if policy == 'entropy' else 1.0
    grids = []
    for k in exit_sets:
        scores = _score(branch_logits[:, k] / temperatures[k], policy).double()
        levels = torch.linspace(0, 1, candidates, dtype=torch.float64)
        grids.append(sorted({sign * v for v in torch.quantile(scores, levels).tolist()} | {_NEVER[policy]}))
    best = dict(simulate_exits(branch_logits, labels, [shared['threshold']] * len(exit_sets), temperatures,
                               segment_macs, policy), thresholds=[shared['threshold']] * len(exit_sets))
    for _ in range(rounds):
        improved = False
        for j, grid in enumerate(grids):
            for t in grid:
                trial = list(best['thresholds'])
                trial[j] = t
                row = simulate_exits(branch_logits, labels, trial, temperatures, segment_macs, policy)
                if row['accuracy'] >= floor and (row['compute'], -row['accuracy']) < (best['compute'],
                                                                                      -best['accuracy']):
                    best, improved = dict(row, thresholds=trial), True
        if not improved:
            break
    return dict(best, base_accuracy=base_acc)
