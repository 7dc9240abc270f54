"""Sila branches as early exits, routed per sample inside a batch (choosing thresholds: `calibration`).

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

from safetensors.torch import save_file

from timm_sila._checks import finite_float, short
from timm_sila.config import sila_name
from timm_sila.io.atomic import atomic_write_file, check_output_file
from timm_sila.io.checkpoint import build_checked, read_safetensors
from timm_sila.io.trust import (CheckpointError, UnsafeFileError, check_file_architecture, parse_file_json,
                                sanitize_file_model_kwargs)
from timm_sila.model import SilaNet
from timm_sila.taps import probe_input_shape
from timm_sila._timm_compat import model_args as timm_model_args
from .macs import segment_macs
from .policy import NEVER, check_policy, exit_score, exits

__all__ = ['EarlyExit', 'ExitResult']


@dataclass
class ExitResult:
    """logits (B, N) in input order (answering set's logits / its temperature); exit_set (B,) the set that
    answered each sample (M-1 … 1 = auxiliary heads, 0 = base head); compute = backbone MACs executed (each
    segment's per-sample MACs times the samples that ran it) divided by the full model's MACs on the whole batch
    (nan for an empty batch, whose outputs are empty); a count of work, not a measured time."""
    logits: torch.Tensor
    exit_set: torch.Tensor
    compute: float


class _AllExited(Exception):
    pass


def _finite_numbers(value, what: str) -> Union[float, List[float]]:
    """A number, or a sequence of numbers, as floats. Python, numpy and 0-d/1-d tensor numbers are accepted;
    booleans, strings, NaN and infinities are refused with ValueError."""
    def one(v):
        number = finite_float(v)
        if number is None:
            raise ValueError(f'{what} must be finite numbers, got {short(value)}.')
        return number
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

    Construction does not time anything. `ExitResult.compute` counts MACs, not time: whether routing pays depends on
    where the taps sit and on the per-batch cost of routing, so measure before shipping for speed
    (`timm_sila.exits.curve.measure_speedup(early_exit, None, batches)`, > 1 = faster than the base model), or use
    `exit_curve`, whose verdict also names the stripped branch that is fastest within the same accuracy drop.
    """

    def __init__(self, model: SilaNet, thresholds: Union[float, Sequence[float], None] = None,
                 policy: str = 'confidence', temperatures: Optional[Sequence[float]] = None,
                 input_size: Optional[Sequence[int]] = None):
        super().__init__()
        if not isinstance(model, SilaNet) or model.stripped:
            raise ValueError('EarlyExit needs a full (not stripped) SilaNet: every branch serves as an exit.')
        self.model = model
        self.policy = check_policy(policy)
        self.exit_sets = list(range(model.sets - 1, 0, -1))  # shallowest tap first
        self.thresholds = self._check_thresholds(thresholds)
        temperatures = [1.0] * model.sets if temperatures is None else _finite_numbers(temperatures, 'temperatures')
        if not isinstance(temperatures, list) or len(temperatures) != model.sets or any(t <= 0 for t in temperatures):
            raise ValueError(f'temperatures must be {model.sets} positive numbers (one per set), got {temperatures}.')
        self.temperatures = temperatures
        self._segment_macs: Dict[tuple, List[int]] = {}
        self._verified: set = set()
        self._verify_model(input_size)

    def _verify_model(self, input_size: Optional[Sequence[int]]) -> None:
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
            return [NEVER[self.policy]] * n
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
        """Run the routed forward; returns (logits, exit_set, samples entering each segment in exit order)."""
        model, b = self.model, x.shape[0]
        out = None
        exit_set = torch.zeros(b, dtype=torch.long, device=x.device)
        active = torch.arange(b, device=x.device)
        entering = [b]
        handles = []

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
                    t = self.thresholds[self.exit_sets.index(k)]
                    keep = ~exits(exit_score(logits, self.policy), t, self.policy)
                leave = ~keep
                out[active[leave]] = logits[leave]
                exit_set[active[leave]] = k
                active = active[keep]
                entering.append(int(active.numel()))
                if active.numel() == 0:
                    raise _AllExited
                return feat[keep]
            return hook

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
        return out, exit_set, entering

    def segment_macs(self, x: torch.Tensor) -> List[int]:
        """Per-sample backbone MACs of each segment in exit order: input → shallowest tap, …, deepest tap →
        output (classifier included); measured once per input size (`timm_sila.exits.macs.segment_macs`)."""
        key = tuple(x.shape[1:])
        if key not in self._segment_macs:
            self._segment_macs[key] = segment_macs(self.model.base, x, [self._tap_module(k) for k in self.exit_sets])
        return list(self._segment_macs[key])

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
        seg = self.segment_macs(x)
        logits, exit_set, entering = self._route(x)
        executed = sum(m * n for m, n in zip(seg, entering))  # segments after the last exit taken ran on nobody
        return ExitResult(logits, exit_set, executed / (sum(seg) * x.shape[0]))

    # --- persistence --------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> None:
        """One .safetensors file: the SilaNet's weights, its sila_* and architecture arguments and this exit
        configuration, written atomically (the previous file stays whole if the write fails). An existing `path`
        is replaced only with `overwrite` (else OutputExistsError, also for a file that appears while saving).
        Refuses (ValueError) a model built with arguments an EarlyExit file may not carry (see
        `timm_sila.io.trust.FILE_MODEL_KWARGS`), so that every saved file loads."""
        check_output_file(path, overwrite)
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
        atomic_write_file(path, lambda tmp: save_file(state, str(tmp), metadata={'timm_sila': json.dumps(meta)}),
                          overwrite=overwrite)

    @classmethod
    def load(cls, path) -> 'EarlyExit':
        """Rebuild a saved EarlyExit (model in eval mode).

        The file may choose weights, never code, URLs, paths or downloads: its model arguments pass the allow-list
        of `timm_sila.io.trust.sanitize_file_model_kwargs`, the architecture must be a registered name, tensors must
        match the model (checked on the meta device before it is built; no silent dtype cast) and the exit
        configuration must be finite. The metadata JSON and every size in it are bounded (`timm_sila.io.trust.
        FILE_LIMITS`). Anything else raises one `CheckpointError` (a ValueError) naming the file; loading performs no
        network access and writes nothing.
        """
        tensors, metadata = read_safetensors(path)
        raw = metadata.get('timm_sila')
        if raw is None:
            raise CheckpointError(f'{path} has no timm_sila early-exit metadata; save it with EarlyExit.save().')
        meta = parse_file_json(raw, f'the early-exit metadata of {path}', parse_constant=_refuse_constant)
        cfg = meta.get('early_exit') if isinstance(meta, dict) else None
        num_classes = meta.get('num_classes') if isinstance(meta, dict) else None
        if (not isinstance(cfg, dict) or not isinstance(meta.get('arch'), str) or isinstance(num_classes, bool)
                or not isinstance(num_classes, int) or num_classes < 1
                or not {'policy', 'thresholds', 'temperatures'} <= set(cfg)):
            raise CheckpointError(f'{path}: its early-exit metadata lacks arch (a name), num_classes (an integer '
                                  f'>= 1) or early_exit (policy, thresholds, temperatures); save it with '
                                  f'EarlyExit.save().')
        name = check_file_architecture(sila_name(check_file_architecture(meta['arch'], path)), path)
        kwargs = sanitize_file_model_kwargs(meta.get('model_args'), path, overridden=('num_classes',))
        kwargs.update(sanitize_file_model_kwargs({'num_classes': num_classes}, path))
        origins = {k: f'model_args.{k}' for k in kwargs}
        origins['num_classes'] = 'num_classes'
        model = build_checked(name, kwargs, tensors, path, origins=origins, what=name)
        try:
            return cls(model.eval(), thresholds=cfg['thresholds'], policy=cfg['policy'],
                       temperatures=cfg['temperatures'])
        except ValueError as e:
            raise CheckpointError(f'{path}: invalid early-exit configuration: {e}') from None


def _refuse_constant(name: str):
    raise ValueError(f'{name} is not a number a file may give')
