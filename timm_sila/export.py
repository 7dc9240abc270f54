"""Deploy one branch: ONNX (onnxruntime-checked) or torch.export `.pt2`, each verified against PyTorch before it lands.

`export(source, branch, format='onnx'|'pt2', out=FILE)` builds the eval-mode model of one branch (branch 0 = the plain
timm model, k >= 1 = backbone up to tap k + head k), traces it once with `torch.export.export` (non-strict, batch
dimension dynamic), and then either converts the program to ONNX (`torch.onnx.export`, the dynamo exporter, at a
stated opset) or saves it with `torch.export.save`. The written file is reloaded -- an onnxruntime CPU session, or
`torch.export.load` -- and run on a seeded random batch of the example size and on a batch of 1 (the dynamic
dimension at work); the largest |logit difference| from the PyTorch model must be within tolerance, else
`ExportParityError` and no file is left behind (the file is written beside `out` and renamed over it only once it
passed, `timm_sila.atomic.atomic_write_file`).

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
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .atomic import atomic_write_file
from .checkpoint import _first_line, _overridden, create_with_img_size, load_silanet, read_checkpoint
from .config import base_arch, sila_name
from .model import SilaNet
from .shipping import CONFIG_NAME, WEIGHTS_NAME, export_model, load_stripped
from .sizes import MemoryBoundError, check_batch_fits

__all__ = ['export', 'export_check', 'format_export', 'load_branch', 'load_checkpoint', 'require_onnx', 'ExportError',
           'ExportParityError', 'MissingExtraError', 'FORMATS', 'DEFAULT_RTOL', 'EXTRA_HINT']

FORMATS = ('onnx', 'pt2')
DEFAULT_RTOL = 1e-4  # max |delta| <= DEFAULT_RTOL * max(1, max |logit|) unless atol is given
EXTRA_HINT = 'pip install "timm-sila[export]"'
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of ONNX export or the onnxruntime benchmark is not installed."""


class ExportError(ValueError):
    """torch could not export the model (an op, control flow or shape it cannot trace or convert), or the runtime
    could not load the file torch wrote."""


class ExportParityError(ValueError):
    """The exported file's outputs differ from the PyTorch model's by more than the tolerance."""


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
    import onnx
    import onnxruntime
    return onnx, onnxruntime


# --- what to export ---------------------------------------------------------------------------------------------
def _branch_of(model: nn.Module) -> int:
    return model.branch if isinstance(model, SilaNet) else 0


def _check_same_branch(model: nn.Module, branch: Optional[int], what: str) -> int:
    have = _branch_of(model)
    if branch is not None and branch != have:
        raise ValueError(f'{what} holds branch {have} only; pass branch={have} (or none), or export from the '
                         f'full SilaNet checkpoint to get branch {branch}.')
    return have


def load_branch(source: Union[str, Path, nn.Module], branch: Optional[int] = None, img_size: Optional[int] = None,
                **load_kwargs) -> Tuple[nn.Module, int, Dict[str, Any]]:
    """(eval-mode model of one branch, its branch index, data config args) for a strip folder, a SilaNet
    checkpoint file, a SilaNet or any other nn.Module (branch 0).

    Folder: `load_stripped(dir, **load_kwargs)`, its one branch. Checkpoint: `load_silanet(path, **load_kwargs)`
    (model=, num_classes=, sets=, taps=, head=, ema=, model kwargs), then `export_model(net, branch)`; `branch`
    is required. The data config args (input size, mean, std) are the file's, range-checked.
    """
    if isinstance(source, SilaNet):
        if load_kwargs:
            raise ValueError(f'{sorted(load_kwargs)} only apply when source is a file or folder.')
        if source.stripped:
            return source.eval(), _check_same_branch(source, branch, 'This stripped SilaNet'), {}
        if branch is None:
            raise ValueError(f'Pass the branch to export: an integer in [0, {source.sets - 1}] (0 = the base).')
        return export_model(source, branch), branch, {}
    if isinstance(source, nn.Module):
        if load_kwargs:
            raise ValueError(f'{sorted(load_kwargs)} only apply when source is a file or folder.')
        return source.eval(), _check_same_branch(source, branch, f'This {type(source).__name__}'), {}
    if not isinstance(source, (str, Path)):
        raise ValueError(f'source must be a strip output folder, a SilaNet checkpoint file or an nn.Module, got '
                         f'{type(source).__name__}.')
    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f'{path} has no {CONFIG_NAME}: pass a folder written by `timm-sila strip` or a '
                                    f'checkpoint file.')
        model = load_stripped(path, **load_kwargs)
        return model, _check_same_branch(model, branch, f'The folder {path}'), {}
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist: pass a strip output folder or a SilaNet checkpoint file.')
    net, data_args = load_checkpoint(path, img_size, **load_kwargs)
    if branch is None:
        raise ValueError(f'{path} holds every branch of a SilaNet; pass the branch to export, an integer in '
                         f'[0, {net.sets - 1}] (0 = the base model).')
    return export_model(net, branch), branch, data_args


def load_checkpoint(path: Union[str, Path], img_size: Optional[int] = None, **load_kwargs
                    ) -> Tuple[SilaNet, Dict[str, Any]]:
    """(full SilaNet, the file's data config args) of a checkpoint; `load_kwargs` as `load_silanet` takes them."""
    kwargs = dict(load_kwargs)
    ema = bool(kwargs.pop('ema', False))
    names = {k: kwargs.pop(k) for k in ('model', 'num_classes', 'sets', 'taps', 'head') if k in kwargs}
    ckpt = read_checkpoint(path, _overridden(kwargs, num_classes=names.get('num_classes'),
                                             sila_sets=names.get('sets'), sila_taps=names.get('taps'),
                                             sila_head=names.get('head'), img_size=img_size))
    return load_silanet(ckpt, ema=ema, img_size=img_size, **names, **kwargs), dict(ckpt.data_config)


def _data_config(model: nn.Module, data_args: Dict[str, Any], img_size: Optional[int]) -> Dict[str, Any]:
    """timm's data config of `model` (input size, mean, std, ...), the file's args and `img_size` taking precedence."""
    from timm.data import resolve_data_config
    args = dict(data_args)
    if img_size is not None:
        args.update(input_size=None, img_size=int(img_size))
    return resolve_data_config(args, model=model)


def _architecture(model: nn.Module) -> str:
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__


# --- export and verification ------------------------------------------------------------------------------------
def _check_out(out: Union[str, Path, None], fmt: str, overwrite: bool, source: Any) -> Path:
    """The refusals of the write, made before the (slow) export."""
    if out is None:
        raise ValueError(f'export() needs out=, the {fmt} file to write (e.g. model.{fmt}).')
    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f'Cannot write {out}: folder {out.parent} does not exist; create it first.')
    if out.is_dir():
        raise IsADirectoryError(f'Cannot write {out}: it is a folder; pass a file path such as {out}/model.{fmt}.')
    if isinstance(source, (str, Path)):
        src = Path(source)
        inputs = [src / CONFIG_NAME, src / WEIGHTS_NAME] if src.is_dir() else [src]
        if any(os.path.realpath(out) == os.path.realpath(p) for p in inputs):
            raise ValueError(f'{out} is an input of the export; write the {fmt} file elsewhere.')
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f'{out} exists; pass overwrite=True (CLI --force) to replace it.')
    return out


_ANSI = re.compile(r'\x1b\[[0-9;]*m')


def _torch_failure(err: BaseException) -> str:
    """'Type: first line' of a torch export error, and of its root cause (what the model does that torch cannot),
    without terminal colours or torch's 'Next steps' boilerplate."""
    def line(e: BaseException) -> str:
        text = _ANSI.sub('', str(e).strip().splitlines()[0]) if str(e).strip() else ''
        text = text.split(' This is step ')[0].split(' Next steps:')[0].strip()
        return f'{type(e).__name__}: {text}' if text else type(e).__name__
    root, seen = err, {id(err)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:  # explicit `raise ... from` links only
        root = root.__cause__
        seen.add(id(root))
    return line(err) if root is err else f'{line(err)} Cause: {line(root)}'


def _export_program(model: nn.Module, x: torch.Tensor, what: str) -> Any:
    """torch.export of `model` on example `x` with a dynamic batch dimension; ExportError when torch cannot."""
    batch = torch.export.Dim('batch', min=1)
    try:
        with torch.no_grad():
            return torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # torch raises many types (UserError, Unsupported, RuntimeError, ...): report, keep cause
        raise ExportError(f'torch.export cannot trace {what}: {_torch_failure(e)}') from e


@contextlib.contextmanager
def _quiet_stdout():
    """torch.onnx prints progress to stdout; move it to stderr (stdout is reserved for a command's result)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _max_diff(expected: torch.Tensor, got: Any) -> float:
    got = torch.as_tensor(got)
    if tuple(got.shape) != tuple(expected.shape):
        return float('inf')
    return float((got.float() - expected.float()).abs().max())


def _reference(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as e:
        raise ValueError(f'{what} does not run on an input of shape {tuple(x.shape)}: {type(e).__name__}: '
                         f'{_first_line(e)}; pass the img_size it was built for.') from e
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f'{what} returns {type(y).__name__}{"" if not isinstance(y, torch.Tensor) else tuple(y.shape)}'
                         f'; export needs a model returning (batch, classes) logits.')
    return y


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
        **load_kwargs,
) -> Dict[str, Any]:
    """Export one branch to `out` (ONNX or torch.export .pt2), verified on reload; returns a report dict.

    `source`: a strip output folder, a SilaNet checkpoint file (then `branch` is required; `load_kwargs` go to
    `load_silanet`: model=, num_classes=, sets=, taps=, head=, ema=, model kwargs), a SilaNet, or any nn.Module
    returning logits (branch 0). `img_size`: the input size (default: the model's / file's data config).
    `batch_size` >= 2 is the example batch (torch.export specialises a size-1 dimension); the file is checked at
    `batch_size` and 1. Raises ExportError (torch cannot export), ExportParityError (max |delta| > tolerance),
    MissingExtraError (ONNX without the extra), MemoryBoundError (the example batches cannot fit in memory: see
    `timm_sila.sizes.check_batch_fits`); in each case `out` is left as it was.
    Report: format, out, branch, architecture, input_size, mean, std, opset, batch_sizes, max_abs_diff (and per
    batch size), max_abs_logit, tolerance, bytes, runtime.
    """
    if format not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {format!r}.')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f'batch_size must be an integer >= 2 (torch.export fixes a batch dimension of size 1), '
                         f'got {batch_size!r}.')
    if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0 and atol == atol):
        raise ValueError(f'atol must be a number >= 0, got {atol!r}.')
    if format == 'onnx':
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
            raise ValueError(f'opset must be an integer >= 18 (the lowest the dynamo exporter writes), got {opset!r}.')
        require_onnx()
    out = _check_out(out, format, overwrite, source)

    model, branch, data_args = load_branch(source, branch, img_size, **load_kwargs)
    cfg = _data_config(model, data_args, img_size)
    arch = _architecture(model)
    what = f'{arch} branch {branch}'
    check_batch_fits(batch_size, cfg['input_size'], model)  # before the example batches exist
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, *cfg['input_size'], generator=g) for n in (batch_size, 1)]
    expected = [_reference(model, x, what) for x in batches]
    program = _export_program(model, batches[0], what)
    if format == 'onnx':
        try:
            with _quiet_stdout():
                onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False,
                                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
        except Exception as e:
            raise ExportError(f'torch.onnx cannot convert {what} to ONNX opset {opset}: {_torch_failure(e)}') from e
    largest = max(float(y.abs().max()) for y in expected)
    tolerance = float(atol) if atol is not None else DEFAULT_RTOL * max(1.0, largest)
    diffs: Dict[int, float] = {}

    def write_and_verify(tmp: Path) -> None:
        if format == 'onnx':
            _, ort = require_onnx()
            onnx_program.save(str(tmp), external_data=False)
            try:
                session = ort.InferenceSession(str(tmp), providers=['CPUExecutionProvider'])
            except Exception as e:  # onnxruntime rejects graphs torch.onnx wrote (e.g. a dangling node input)
                raise ExportError(f'onnxruntime cannot load the ONNX graph torch.onnx wrote for {what} (opset '
                                  f'{opset}): {_torch_failure(e).replace(str(tmp), "<file>")}; nothing was '
                                  f'written.') from e
            run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        else:
            torch.export.save(program, str(tmp))
            try:
                reloaded = torch.export.load(str(tmp)).module()
            except Exception as e:
                raise ExportError(f'torch.export.load cannot reload the .pt2 of {what}: {_torch_failure(e)}; '
                                  f'nothing was written.') from e
            run = lambda x: reloaded(x).detach()
        for x, y in zip(batches, expected):
            try:
                with torch.no_grad():
                    diffs[x.shape[0]] = _max_diff(y, run(x))
            except Exception as e:
                raise ExportParityError(f'The exported {format} file of {what} fails to run on a batch of '
                                        f'{x.shape[0]}: {type(e).__name__}: {_first_line(e)}') from e
        worst = max(diffs.values())
        if not worst <= tolerance:
            raise ExportParityError(
                f'The exported {format} file of {what} disagrees with PyTorch: max |delta| = {worst:.3g} over '
                f'batches of {sorted(diffs)} > tolerance {tolerance:.3g} (largest |logit| {largest:.3g}); nothing '
                f'was written. Check the model for ops that behave differently when traced, or pass a larger atol '
                f'if this difference is acceptable.')

    atomic_write_file(out, write_and_verify, overwrite=overwrite)
    if format == 'onnx':
        import onnxruntime
        runtime = f'onnxruntime {onnxruntime.__version__}'
    else:
        runtime = f'torch {torch.__version__}'
    return dict(format=format, out=str(out), branch=branch, architecture=arch,
                input_size=list(cfg['input_size']), mean=list(cfg['mean']), std=list(cfg['std']),
                opset=opset if format == 'onnx' else None, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                batch_sizes=sorted(diffs), max_abs_diff=max(diffs.values()),
                max_abs_diff_per_batch={str(k): v for k, v in sorted(diffs.items())}, max_abs_logit=largest,
                tolerance=tolerance, bytes=out.stat().st_size, runtime=runtime)


def format_export(report: Dict[str, Any]) -> str:
    """Two lines for the CLI: what was written and its verification."""
    fmt = report['format'] + (f' (opset {report["opset"]})' if report['opset'] else '')
    return (f'wrote {report["out"]} ({report["bytes"]:,} bytes): {report["architecture"]} branch '
            f'{report["branch"]} as {fmt}, input (batch, {", ".join(map(str, report["input_size"]))}), batch '
            f'dimension dynamic\nverified with {report["runtime"]} on batches of {report["batch_sizes"]}: max |delta| '
            f'= {report["max_abs_diff"]:.2e} <= tolerance {report["tolerance"]:.2e}; feed images normalised with '
            f'mean={_fmt_floats(report["mean"])} std={_fmt_floats(report["std"])}')


def _fmt_floats(values: Sequence[float]) -> str:
    return '(' + ', '.join(f'{v:.4g}' for v in values) + ')'


def export_check(model_name: str, img_size: int, branch: int, format: str = 'onnx', num_classes: int = 10,
                 **model_kwargs) -> Tuple[bool, str]:
    """(ok, reason) for the coverage sweep: can branch `branch` of `model_name` (random weights) be exported
    to `format` and pass the parity check? reason: 'max |delta| ...' when ok, else the one-line failure."""
    try:
        if branch == 0:
            model = create_with_img_size(base_arch(model_name), img_size, num_classes=num_classes, **model_kwargs)
        else:
            model = create_with_img_size(sila_name(model_name), img_size, num_classes=num_classes, sila_branch=branch,
                                         sila_stripped=True, **model_kwargs)
        with tempfile.TemporaryDirectory(prefix='timm-sila-export-check-') as tmp:
            report = export(model.eval(), branch, format, Path(tmp) / f'model.{format}', img_size=img_size)
    except MissingExtraError:
        raise
    except Exception as e:  # the sweep records every failure, whatever raised it
        return False, f'{type(e).__name__}: {_first_line(e)}'
    return True, f'max |delta| {report["max_abs_diff"]:.1e} (tolerance {report["tolerance"]:.1e})'


# --- CLI: timm-sila export (parser: timm_sila_cli) --------------------------------------------------------------
def cli_load_kwargs(args: Any) -> Dict[str, Any]:
    """The checkpoint-loading options of a `timm-sila export|bench` command line; refused for a folder source."""
    names = dict(model=args.model, num_classes=args.num_classes, sets=args.sets, taps=args.taps, head=args.head)
    given = {k: v for k, v in names.items() if v is not None}
    if args.ema:
        given['ema'] = True
    if Path(args.source).is_dir() and given:
        flags = ', '.join('--' + k.replace('_', '-') for k in given)
        raise ValueError(f'{flags}: only for a checkpoint file; the folder {args.source} holds one model, named in '
                         f'its config.json.')
    return dict(given, **args.model_kwargs)


def run_export(args: Any) -> int:
    """`timm-sila export`: writes the verified file, prints what was written (or the JSON report)."""
    from .cli import print_json
    try:
        report = export(args.source, args.branch, args.format, args.out, img_size=args.img_size,
                        batch_size=args.batch_size, atol=args.atol, opset=args.opset, overwrite=args.force,
                        **cli_load_kwargs(args))
    except MemoryBoundError as e:  # the API's message names batch_size / img_size; the CLI's flags differ
        raise ValueError(e.message('--batch-size', '--img-size')) from e
    if args.json:
        print_json(report)
    else:
        print(format_export(report))
    return 0
