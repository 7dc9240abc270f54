"""Deploy one branch: ONNX (onnxruntime-checked) or torch.export `.pt2`, each verified against PyTorch before it lands.

`export(source, branch, format='onnx'|'pt2', out=FILE)` builds the eval-mode model of one branch (branch 0 = the plain
timm model, k >= 1 = backbone up to tap k + head k) and exports it with a dynamic batch dimension -- and dynamic
height and width with `dynamic_size=True`, for models timm does not mark fixed-size. `.pt2`: `torch.export.export`
(non-strict), saved with `torch.export.save`. ONNX, by `exporter`: 'dynamo' converts that torch.export program with
`torch.onnx.export(program, dynamo=True)` at a stated opset; 'torchscript' uses torch.onnx's TorchScript-based
exporter (`torch.jit.trace` + `dynamic_axes`), which handles some models the dynamo path cannot (attention on 5D
tensors, views of relative position tables); 'auto' (the default) tries dynamo and falls back to torchscript when
dynamo fails at any step -- tracing, conversion, loading or the parity check -- and the report says which wrote
the file and why. The written file is reloaded -- an onnxruntime CPU session, or `torch.export.load` -- and run on
seeded random batches of the example size and of 1 (the dynamic dimension at work), and with `dynamic_size` also at
a second input size (`second_input_size`: 32 more rows, 64 more columns); the largest |logit difference| from the
PyTorch model must be within tolerance, else `ExportParityError` and no file is left behind (the file is written
beside `out` and renamed over it only once it passed, `timm_sila.io.atomic.atomic_write_file`).

Tolerance (fp32). By default max |delta| <= 1e-4 * max(1, max |logit|). ONNX Runtime and PyTorch sum convolutions,
matmuls and reductions in different orders, so their fp32 results differ by rounding only: relative to
max(1, max |logit|) we measured 1.2e-6 (resnet18 branch 0, trained-like BatchNorm), 5.4e-7 (its branch 1) and
9.7e-8 (convnext_atto branch 1) at 32x32 -- >= 80x below the bound -- while a wrong op (a missing layer, wrong
padding or normalisation) moves the logits by a sizeable fraction of their magnitude. The bound scales with the
logits because rounding does (trained models' logits reach tens); `atol=` replaces it with a fixed absolute bound.

The auxiliary heads' fast form (`heads.ConvPoolHead`, a custom autograd.Function) needs no special casing:
`torch.export` traces its forward into plain aten ops (slice, sum, sub, linear), which ONNX and `.pt2` hold as is.

ONNX needs the optional extra `pip install timm-sila[export]` (onnx, onnxscript, onnxruntime); `.pt2` needs torch only.
"""
import contextlib
import inspect
import io
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import get_model_input_config

from timm_sila._checks import first_line, require_int
from timm_sila.data.config import resolve_data_config
from timm_sila.data.memory import check_batch_fits
from timm_sila.io.atomic import atomic_write_file, check_output_file
from timm_sila.model import SilaNet
from .load import load_branch
from .strip import CONFIG_NAME, WEIGHTS_NAME

__all__ = ['export', 'fixed_size_reason', 'second_input_size', 'require_onnx', 'ExportError', 'ExportParityError',
           'MissingExtraError', 'FORMATS', 'EXPORTERS', 'DEFAULT_RTOL', 'EXTRA_HINT']

FORMATS = ('onnx', 'pt2')
EXPORTERS = ('auto', 'dynamo', 'torchscript')  # ONNX; auto = dynamo, then torchscript if it fails
DEFAULT_RTOL = 1e-4  # max |delta| <= DEFAULT_RTOL * max(1, max |logit|) unless atol is given
EXTRA_HINT = 'pip install "timm-sila[export]"'
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of ONNX export or the onnxruntime benchmark is not installed."""


class _ExportFailure(ValueError):
    """An exporter's attempt failed; `cause` is its step and root cause in one short line (for a fallback note)."""

    def __init__(self, message: str, cause: Optional[str] = None):
        super().__init__(message)
        self.cause = cause or message


class ExportError(_ExportFailure):
    """torch could not export the model (an op, control flow or shape it cannot trace or convert), or the runtime
    could not load the file torch wrote."""


class ExportParityError(_ExportFailure):
    """The exported file fails to run, or its outputs differ from the PyTorch model's by more than the tolerance."""


def require_onnx() -> Tuple[Any, Any]:
    """(onnx, onnxruntime), or MissingExtraError naming the extra to install."""
    missing = []
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f'ONNX export and the onnxruntime benchmark need {", ".join(missing)}, which '
                                f'{"is" if len(missing) == 1 else "are"} not installed: {EXTRA_HINT}.')
    import onnx  # optional dependencies (the export extra), checked above
    import onnxruntime
    return onnx, onnxruntime


def _architecture(model: nn.Module) -> str:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__


# --- export and verification ------------------------------------------------------------------------------------
def _check_out(out: Union[str, Path, None], fmt: str, overwrite: bool, source: Any) -> Path:
    """The refusals of the write, made before the (slow) export."""
    if out is None:
        raise ValueError(f'export() needs out=, the {fmt} file to write (e.g. model.{fmt}).')
    return check_output_file(out, overwrite, _inputs(source))


def _inputs(source: Any) -> List[Path]:
    """The files an export from `source` reads (never its output, even with overwrite)."""
    if not isinstance(source, (str, Path)):
        return []
    src = Path(source)
    return [src / CONFIG_NAME, src / WEIGHTS_NAME] if src.is_dir() else [src]


_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _error_line(e: BaseException) -> str:
    """'Type: first line' of an error, without terminal colours or torch's 'Next steps' boilerplate."""
    text = _ANSI.sub('', str(e).strip().splitlines()[0]) if str(e).strip() else ''
    text = text.split(' This is step ')[0].split(' Next steps:')[0].strip()
    return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _root(err: BaseException) -> BaseException:
    """The end of the explicit `raise ... from` chain of `err` (what the model does that torch cannot)."""
    root, seen = err, {id(err)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:  # explicit links only, not __context__
        root = root.__cause__
        seen.add(id(root))
    return root


def _torch_failure(err: BaseException) -> str:
    """'Type: first line' of a torch export error, and of its root cause (what the model does that torch cannot),
    without terminal colours or torch's 'Next steps' boilerplate."""
    root = _root(err)
    return _error_line(err) if root is err else f'{_error_line(err)} Cause: {_error_line(root)}'


def _export_program(model: nn.Module, x: torch.Tensor, what: str, dynamic_size: bool = False) -> Any:
    """torch.export of `model` on example `x` with a dynamic batch dimension (and height and width when
    `dynamic_size`); ExportError when torch cannot."""
    dims = {0: torch.export.Dim('batch', min=1)}
    if dynamic_size:  # DYNAMIC, not named Dims: torch derives the sizes' constraints (multiples, minima) itself
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    try:
        with torch.no_grad():
            return torch.export.export(model, (x,), dynamic_shapes=(dims,), strict=False)
    except Exception as e:  # torch raises many types (UserError, Unsupported, RuntimeError, ...): report, keep cause
        raise ExportError(f'torch.export cannot trace {what}: {_torch_failure(e)}',
                          f'torch.export: {_error_line(_root(e))}') from e


@contextlib.contextmanager
def _quiet_stdout():
    """torch.onnx prints progress to stdout; move it to stderr (stdout is reserved for a command's result)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _dynamo_onnx(program: Any, opset: int, what: str) -> Callable[[Path], None]:
    """The dynamo exporter's ONNX conversion of a torch.export program; returns a function writing it to a path."""
    try:
        with _quiet_stdout():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False,
                                             input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    except Exception as e:
        raise ExportError(f'torch.onnx cannot convert {what} to ONNX opset {opset}: {_torch_failure(e)}',
                          f'torch.onnx: {_error_line(_root(e))}') from e
    return lambda path: onnx_program.save(str(path), external_data=False)


def _rms_norm_symbolic(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm for the TorchScript exporter: x / sqrt(mean(x * x over the normalised dims) + eps) * weight
    (ONNX's RMSNormalization needs opset 23)."""
    from torch.onnx import symbolic_helper as sh  # deferred: torch.onnx's TorchScript exporter only runs here
    dims = sh._maybe_get_const(normalized_shape, 'is')
    axes = g.op('Constant', value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.long))
    eps = None if sh._is_none(eps) else sh._maybe_get_const(eps, 'f')
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)  # torch's default: the dtype's eps (fp32)
    mean_square = g.op('ReduceMean', g.op('Mul', x, x), axes, keepdims_i=1)
    y = g.op('Div', x, g.op('Sqrt', g.op('Add', mean_square, g.op('Constant', value_t=torch.tensor(eps)))))
    return y if sh._is_none(weight) else g.op('Mul', y, weight)


# conversions torch's TorchScript exporter lacks, added for the length of one export (name -> symbolic function)
_TORCHSCRIPT_SYMBOLICS = {'aten::rms_norm': _rms_norm_symbolic}  # timm's RmsNorm (Gemma 4's ViT, ...)


@contextlib.contextmanager
def _torchscript_symbolics(opset: int):
    """Register `_TORCHSCRIPT_SYMBOLICS` that torch has no conversion for at `opset`; unregister them after. One
    that is registered already (by torch or the caller) is left as it is."""
    try:
        # torch internals, imported only when the TorchScript exporter runs; absent or moved in other torch versions
        from torch.onnx._internal.torchscript_exporter.registration import registry
        added = [name for name in _TORCHSCRIPT_SYMBOLICS if not registry.is_registered_op(name, opset)]
    except (ImportError, AttributeError):  # cannot tell what torch has: change nothing
        added = []
    for name in added:
        torch.onnx.register_custom_op_symbolic(name, _TORCHSCRIPT_SYMBOLICS[name], opset)
    try:
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _torchscript_onnx(model: nn.Module, x: torch.Tensor, opset: int, dynamic_size: bool,
                      what: str) -> Callable[[Path], None]:
    """torch.onnx's TorchScript-based exporter (torch.jit.trace on example `x`), batch (and height, width) marked
    dynamic; returns a function writing the file. The tracer's warnings (values it records as constants; its own
    deprecation) are not shown: the parity check at a second batch size (and input size) is what decides."""
    axes = {0: 'batch', 2: 'height', 3: 'width'} if dynamic_size else {0: 'batch'}
    buffer = io.BytesIO()
    try:
        with _quiet_stdout(), warnings.catch_warnings(), torch.no_grad(), _torchscript_symbolics(opset):
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export',
                                    category=DeprecationWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx\.')
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, verbose=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: {0: 'batch'}})
    except Exception as e:
        raise ExportError(f'torch.onnx (TorchScript) cannot convert {what} to ONNX opset {opset}: '
                          f'{_torch_failure(e)}', f'torch.onnx: {_error_line(_root(e))}') from e
    data = buffer.getvalue()
    return lambda path: Path(path).write_bytes(data)


def _max_diff(expected: torch.Tensor, got: Any) -> float:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(expected.shape):
        return float('inf')
    return float((got.float() - expected.float()).abs().max())


def _reference(model: nn.Module, x: torch.Tensor, what: str, hint: str = 'pass the img_size it was built for'
               ) -> torch.Tensor:
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:
        raise ValueError(f'{what} does not run on an input of shape {tuple(x.shape)}: {type(e).__name__}: '
                         f'{first_line(e)}; {hint}.') from e
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f'{what} returns {type(y).__name__}{"" if not isinstance(y, torch.Tensor) else tuple(y.shape)}'
                         f'; export needs a model returning (batch, classes) logits.')
    return y


def second_input_size(height: int, width: int) -> Tuple[int, int]:
    """The second (height, width) at which a dynamic-size export is checked: larger on both sides, by different
    amounts (so neither a size baked into the graph nor height and width swapped goes unnoticed), multiples of 32
    apart (so models that downsample by 32 see whole extra rows and columns)."""
    return height + 32, width + 64


def fixed_size_reason(model: nn.Module, arch: str) -> Optional[str]:
    """Why `model` cannot be exported with a dynamic input size, from timm's traits (`fixed_input_size`, which
    timm clears for a model built with dynamic_img_size=True); None when timm says it takes any size."""
    try:
        fixed = bool(get_model_input_config(model).get('fixed_input_size'))
    except Exception:  # not a timm model: the check at a second input size decides
        return None
    if not fixed:
        return None
    base = model.base if isinstance(model, SilaNet) else model
    grid = getattr(getattr(base, 'patch_embed', None), 'grid_size', None)
    if grid is not None and isinstance(getattr(base, 'pos_embed', None), torch.Tensor):
        why = f'its position embedding is {grid[0]}x{grid[1]}'
    elif grid is not None:
        why = f'it is built for a {grid[0]}x{grid[1]} patch grid'
    else:
        why = "timm's traits mark it fixed_input_size"
    try:
        takes_dynamic = 'dynamic_img_size' in inspect.signature(type(base).__init__).parameters
    except (TypeError, ValueError):
        takes_dynamic = False
    one_size = 'drop dynamic_size=True (CLI --dynamic-size) to export it at one size'
    todo = (f'build it with dynamic_img_size=True (CLI --model-kwargs dynamic_img_size=True), or {one_size}'
            if takes_dynamic else f'{one_size}, the one you deploy (img_size, CLI --img-size)')
    return f'{arch} has a fixed input size ({why}); {todo}.'


def _size(x: torch.Tensor) -> str:
    return f'{x.shape[-2]}x{x.shape[-1]}'


def export(
        source: Union[str, Path, nn.Module],
        branch: Optional[int] = None,
        format: str = 'onnx',
        out: Union[str, Path, None] = None,
        *,
        img_size: Optional[int] = None,
        batch_size: int = 2,
        atol: Optional[float] = None,
        opset: int = 18,
        overwrite: bool = False,
        dynamic_size: bool = False,
        exporter: str = 'auto',
        **load_kwargs,
) -> Dict[str, Any]:
    """Export one branch to `out` (ONNX or torch.export .pt2), verified on reload; returns a report dict.

    `source`: a strip output folder, a SilaNet checkpoint file (then `branch` is required; `load_kwargs` go to
    `load_silanet`: model=, num_classes=, sets=, taps=, head=, ema=, model kwargs), a SilaNet, or any nn.Module
    returning logits (branch 0). `img_size`: the example input size (default: the model's / file's data config).
    `batch_size` >= 2 is the example batch (torch.export specialises a size-1 dimension); the file is checked at
    `batch_size` and 1. `dynamic_size`: height and width dynamic too (refused, ValueError, for a model timm marks
    fixed-size); the file is then also checked at `second_input_size(img_size)`. `exporter` (ONNX only): 'dynamo'
    (torch.export + torch.onnx), 'torchscript' (torch.onnx's TorchScript-based exporter), or 'auto' = dynamo, then
    torchscript when dynamo fails (to export, to load, to run or to match); the report says which wrote the file.
    Raises ExportError (torch cannot export), ExportParityError (the file fails to run or max |delta| > tolerance;
    with 'auto', whichever the last exporter met, its message naming both exporters' causes), MissingExtraError
    (ONNX without the extra), MemoryBoundError (the example batches cannot fit in memory: see
    `timm_sila.data.memory.check_batch_fits`); in each case `out` is left as it was.
    Report: format, out, branch, architecture, input_size, mean, std, opset, exporter, exporter_reason,
    dynamic_axes, input_sizes, batch_sizes, max_abs_diff (and per batch size, and per input shape), max_abs_logit,
    tolerance, bytes, runtime.
    """
    if format not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {format!r}.')
    batch_size = require_int(batch_size, 'batch_size', 2, 'torch.export fixes a batch dimension of size 1')
    if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0 and atol == atol):
        raise ValueError(f'atol must be a number >= 0, got {atol!r}.')
    if format == 'onnx':
        opset = require_int(opset, 'opset', 18, 'the lowest the dynamo exporter writes')
        require_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}.')
    if format == 'pt2' and exporter == 'torchscript':
        raise ValueError("exporter='torchscript' (CLI --exporter) writes ONNX only: a .pt2 file is always written by "
                         "torch.export; leave the exporter at auto, or export to ONNX (format='onnx', CLI --format).")
    if not isinstance(dynamic_size, bool):
        raise ValueError(f'dynamic_size must be True or False, got {dynamic_size!r}.')
    out = _check_out(out, format, overwrite, source)

    model, branch, data_args = load_branch(source, branch, img_size, **load_kwargs)
    cfg = resolve_data_config(model, data_args, img_size)
    arch = _architecture(model)
    what = f'{arch} branch {branch}'
    chans, height, width = cfg['input_size']
    sizes = [(height, width)]
    if dynamic_size:
        refusal = fixed_size_reason(model, arch)
        if refusal:
            raise ValueError(refusal)
        sizes.append(second_input_size(height, width))
    for h, w in sizes:  # before the example batches exist
        check_batch_fits(batch_size, (chans, h, w), model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, chans, h, w, generator=g) for h, w in sizes for n in (batch_size, 1)]
    expected = [_reference(model, x, what) for x in batches[:2]]
    expected += [_reference(model, x, what, f'so it cannot be exported with a dynamic input size (checked at '
                                            f'{height}x{width} and {_size(x)}); export it without dynamic_size (CLI '
                                            f'--dynamic-size)') for x in batches[2:]]
    largest = max(float(y.abs().max()) for y in expected)
    tolerance = float(atol) if atol is not None else DEFAULT_RTOL * max(1.0, largest)
    diffs: Dict[Tuple[int, int, int], float] = {}

    def verify(run: Callable[[torch.Tensor], Any], tried: str) -> None:
        """Run the reloaded file on every check batch; ExportParityError when one fails or differs."""
        diffs.clear()
        for x, y in zip(batches, expected):
            try:
                with torch.no_grad():
                    diffs[(x.shape[0], x.shape[2], x.shape[3])] = _max_diff(y, run(x))
            except Exception as e:
                raise ExportParityError(
                    f'The {tried} file of {what} fails to run on a batch of {x.shape[0]} at {_size(x)}: '
                    f'{type(e).__name__}: {first_line(e)}',
                    f'the file fails to run on a batch of {x.shape[0]} at {_size(x)}: {_error_line(e)}') from e
        worst = max(diffs.values())
        if not worst <= tolerance:
            at = max(diffs, key=diffs.get)
            raise ExportParityError(
                f'The {tried} file of {what} disagrees with PyTorch: max |delta| = {worst:.3g} (batch of {at[0]} at '
                f'{at[1]}x{at[2]}) > tolerance {tolerance:.3g} (largest |logit| {largest:.3g}); nothing was written. '
                f'Check the model for ops that behave differently when traced, or pass a larger atol if this '
                f'difference is acceptable.',
                f'max |delta| {worst:.3g} > tolerance {tolerance:.3g} (batch of {at[0]} at {at[1]}x{at[2]})')

    def write_onnx(convert: Callable[[], Callable[[Path], None]], tried: str) -> None:
        save = convert()

        def write_and_verify(tmp: Path) -> None:
            _, ort = require_onnx()
            save(tmp)
            try:
                session = ort.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
            except Exception as e:  # onnxruntime rejects graphs torch.onnx wrote (e.g. a dangling node input)
                failure = _torch_failure(e).replace(str(tmp), '<file>')
                raise ExportError(f'onnxruntime cannot load the ONNX graph the {tried} wrote for {what} (opset '
                                  f'{opset}): {failure}; nothing was written.',
                                  f'onnxruntime cannot load it: {_error_line(_root(e))}'.replace(str(tmp), '<file>')
                                  ) from e
            verify(lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], f'ONNX ({tried})')

        atomic_write_file(out, write_and_verify, overwrite=overwrite, sources=_inputs(source))

    def write_pt2() -> None:
        program = _export_program(model, batches[0], what, dynamic_size)

        def write_and_verify(tmp: Path) -> None:
            torch.export.save(program, str(tmp))
            try:
                reloaded = torch.export.load(str(tmp)).module()
            except Exception as e:
                raise ExportError(f'torch.export.load cannot reload the .pt2 of {what}: {_torch_failure(e)}; '
                                  f'nothing was written.') from e
            verify(lambda x: reloaded(x).detach(), 'pt2')

        atomic_write_file(out, write_and_verify, overwrite=overwrite, sources=_inputs(source))

    onnx_exporters = {
        'dynamo': lambda: write_onnx(lambda: _dynamo_onnx(_export_program(model, batches[0], what, dynamic_size),
                                                          opset, what), 'dynamo exporter'),
        'torchscript': lambda: write_onnx(lambda: _torchscript_onnx(model, batches[0], opset, dynamic_size, what),
                                          'TorchScript exporter'),
    }
    if format == 'pt2':
        write_pt2()
        used, reason = 'torch.export', None
    elif exporter != 'auto':
        onnx_exporters[exporter]()
        used, reason = exporter, 'requested'
    else:
        try:
            onnx_exporters['dynamo']()
            used, reason = 'dynamo', None
        except (ExportError, ExportParityError) as dynamo_failed:
            try:
                onnx_exporters['torchscript']()
            except (ExportError, ExportParityError) as torchscript_failed:
                raise type(torchscript_failed)(
                    f'Neither ONNX exporter can export {what}: dynamo: {dynamo_failed.cause}; torchscript: '
                    f'{torchscript_failed.cause}. Nothing was written.',
                    f'dynamo: {dynamo_failed.cause}; torchscript: {torchscript_failed.cause}') from torchscript_failed
            used, reason = 'torchscript', f'dynamo failed: {dynamo_failed.cause}'

    if format == 'onnx':
        _, onnxruntime = require_onnx()
        runtime = f'onnxruntime {onnxruntime.__version__}'
    else:
        runtime = f'torch {torch.__version__}'
    per_batch: Dict[str, float] = {}
    for (n, _, _), d in sorted(diffs.items()):
        per_batch[str(n)] = max(d, per_batch.get(str(n), 0.0))
    return dict(format=format, out=str(out), branch=branch, architecture=arch,
                input_size=list(cfg['input_size']), mean=list(cfg['mean']), std=list(cfg['std']),
                opset=opset if format == 'onnx' else None, exporter=used, exporter_reason=reason,
                input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                dynamic_axes=['batch', 'height', 'width'] if dynamic_size else ['batch'],
                input_sizes=[list(s) for s in sizes], batch_sizes=sorted({n for n, _, _ in diffs}),
                max_abs_diff=max(diffs.values()), max_abs_diff_per_batch=per_batch,
                max_abs_diff_per_input={f'{n}x{chans}x{h}x{w}': d for (n, h, w), d in sorted(diffs.items())},
                max_abs_logit=largest, tolerance=tolerance, bytes=out.stat().st_size, runtime=runtime)
