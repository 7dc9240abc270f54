"""Training logits that carry the Sila loss into unmodified criteria (timm train.py, timm.task).

A SilaNet in train mode returns `SilaLogits`, a (B, M·N) tensor subclass. Criteria built on
`F.cross_entropy` (nn.CrossEntropyLoss, with or without label smoothing) or `F.log_softmax`
(timm's LabelSmoothingCrossEntropy, SoftTargetCrossEntropy) then compute exactly the Sila loss.
Every other operation on the logits raises `SilaLossError`, and a backward pass that reaches the
logits without the Sila loss having been computed on them (e.g. a wrapper stripped the subclass)
raises too: a wrong loss never trains silently.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .functional import sila_cross_entropy, sila_log_probs
from ._trainpy_hints import hint_for_op

__all__ = ['SilaLogits', 'SilaLossError', 'wrap_sila_logits']


class SilaLossError(RuntimeError):
    """A training configuration would not compute the Sila loss on a SilaNet's training logits."""


_SUPPORTED = (
    'Supported criteria: nn.CrossEntropyLoss / F.cross_entropy (train.py default, --smoothing), '
    "timm's LabelSmoothingCrossEntropy (--smoothing) and SoftTargetCrossEntropy (--mixup/--cutmix), "
    'or timm_sila.SilaLoss.')


@dataclass
class _SilaState:
    num_classes: int
    beta: float
    decay: float
    consumed: bool = False


class _SilaGuard(torch.autograd.Function):
    """Identity whose backward fails if the Sila loss was never computed on its output."""

    @staticmethod
    def forward(ctx, logits, state):
        ctx.state = state
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.state.consumed:
            raise SilaLossError(
                'Gradients reached the SilaNet training logits, but no Sila loss was computed on them: something '
                'between the model and the criterion turned them into a plain tensor, so the loss would have been '
                'a plain cross-entropy over M·N classes. Known causes: DistributedDataParallel with '
                'find_unused_parameters=True or static_graph=True (timm train.py never sets these; a custom DDP '
                'setup must not), a torch.compile setup that drops tensor subclasses (train.py --torchcompile '
                'keeps them; if this error appears with --torchcompile, train without it), '
                'or a criterion that reads the logits through an unsupported path. ' + _SUPPORTED)
        return grad, None


_PASSTHROUGH = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__, torch.Tensor.__repr__,
    torch.Tensor.__format__, torch.Tensor.is_floating_point, torch.Tensor.is_contiguous, torch.Tensor.data_ptr,
    torch.Tensor.element_size, torch.Tensor.get_device, torch.Tensor.__hash__, torch.Tensor.register_hook,
}
_CROSS_ENTROPY = {F.cross_entropy}
_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax}


def _describe(func) -> str:
    return getattr(func, '__qualname__', None) or getattr(func, '__name__', None) or repr(func)


class SilaLogits(torch.Tensor):
    """(B, M·N) SilaNet training logits ordered [set 0 | set 1 | ... | set M-1].

    `F.cross_entropy(logits, target, label_smoothing=ε)` and `F.log_softmax(logits, -1)` are answered with the
    Sila loss and the folded (B, N) Sila log-probabilities; any other operation raises `SilaLossError`.
    `weight=`, `ignore_index=`, `reduction=` and `label_smoothing=` keep their torch meaning (`sila_cross_entropy`).
    `unwrap()` returns the plain tensor for code that computes the Sila loss itself.
    """

    _sila: _SilaState

    def unwrap(self) -> torch.Tensor:
        """Plain (B, M·N) tensor; the caller takes responsibility for applying the Sila loss."""
        self._sila.consumed = True
        with torch._C.DisableTorchFunctionSubclass():
            return self.view_as(self)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CROSS_ENTROPY:
            return _cross_entropy(*args, **kwargs)
        if func in _LOG_SOFTMAX:
            return _log_softmax(*args, **kwargs)
        if func in _PASSTHROUGH or getattr(func, '__name__', '') == '__get__':
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise SilaLossError(
            f'`{_describe(func)}` was applied to SilaNet training logits (B, M·N). The Sila loss cannot be carried '
            f'through it, so training would optimise the wrong objective. {hint_for_op(getattr(func, "__name__", ""))}'
            + _SUPPORTED + ' To use the raw logits deliberately, call `.unwrap()` first.')


def _sila_state(x) -> _SilaState:
    return x._sila


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction='mean', label_smoothing=0.0):
    if size_average is not None or reduce is not None:
        raise SilaLossError('The legacy size_average/reduce arguments are not supported by the Sila loss; use '
                            "reduction='mean'/'sum'/'none'. " + _SUPPORTED)
    state = _sila_state(input)
    plain = input.unwrap()
    return sila_cross_entropy(plain, target, state.num_classes, state.beta, state.decay, smoothing=label_smoothing,
                              reduction=reduction, weight=weight, ignore_index=ignore_index)


def _log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    ndim = input.dim()
    if dim is None or dim not in (-1, ndim - 1):
        raise SilaLossError(f'log_softmax over dim={dim} of SilaNet training logits; only the class dimension '
                            f'(-1) is supported. ' + _SUPPORTED)
    state = _sila_state(input)
    plain = input.unwrap()
    if dtype is not None:
        plain = plain.to(dtype)
    return sila_log_probs(plain, state.num_classes, state.beta, state.decay)


def wrap_sila_logits(logits: torch.Tensor, num_classes: int, beta: float, decay: float) -> SilaLogits:
    """Wrap plain (B, M·N) logits as SilaLogits, guarded so that a backward without the Sila loss fails."""
    state = _SilaState(num_classes, beta, decay)
    if torch.is_grad_enabled() and logits.requires_grad:
        logits = _SilaGuard.apply(logits, state)
    out = logits.as_subclass(SilaLogits)
    out._sila = state
    return out
