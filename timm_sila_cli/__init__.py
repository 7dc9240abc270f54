"""`timm-sila` console script: argument parsing and error reporting, without torch or timm.

This package sits beside `timm_sila`, not inside it: importing anything under `timm_sila` runs its `__init__`,
which registers the sila_* models with timm and so imports torch (seconds on a cold start). From here `--help`
and usage errors answer at once; a command's handler ('module:function' in its parser's `handler` default) is
imported only to run it.

Each subcommand is an `add_<name>_parser(subparsers)` function in `SUBCOMMANDS`. Exit status: 0 on success, 2 on
bad input, reported as one line on stderr, `timm-sila COMMAND: error: ...` (`--debug` raises instead); a warning
is one line too, `timm-sila COMMAND: warning: ...`. With `--json`, stdout holds the JSON document and nothing else
(progress and warnings go to stderr).
"""
import argparse
import ast
import errno
import importlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

__all__ = ['main', 'build_parser', 'SUBCOMMANDS', 'BAD_INPUT', 'error_line']

# Errors that mean the input or the environment is wrong (a missing or unwritable file, a full disk, a value out
# of range): reported in one line with exit status 2. Anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, OSError)

# The API argument names library errors use (`err.message(**API_FLAGS)`), and the flags that set them here.
API_FLAGS = dict(overwrite='--force', batch_size='--batch-size', img_size='--img-size')

_OS_HINTS = {
    errno.ENOSPC: 'the disk is full: free some space or write elsewhere',
    errno.EFBIG: 'the file is larger than this system or file size limit allows: write elsewhere',
    errno.EDQUOT: 'the disk quota is used up: free some space or write elsewhere',
    errno.EACCES: 'check the permissions, or use a path you can access',
    errno.EPERM: 'check the permissions, or use a path you can access',
    errno.EROFS: 'the file system is read-only: write elsewhere',
}


def error_line(err: BaseException) -> str:
    """One line describing a BAD_INPUT error; an OSError from the system says which file and what to do."""
    worded = callable(getattr(err, 'message', None))  # a library error naming API arguments: say the flags instead
    text = err.message(**API_FLAGS) if worded else str(err)
    if isinstance(err, OSError):
        if worded:
            pass
        elif err.strerror and err.filename is not None:  # as the OS raised it: "[Errno 28] ...: 'path'"
            name = os.fsdecode(err.filename) if isinstance(err.filename, bytes) else str(err.filename)
            text = f'{err.strerror}: {name}'
        elif err.strerror:
            text = err.strerror
        hint = _OS_HINTS.get(err.errno)
        if hint:
            text = f'{text} ({hint})'
    return ' '.join(text.split()) or type(err).__name__


def _one_line_warnings(command: str) -> Callable:
    """A `warnings.showwarning` that writes `timm-sila COMMAND: warning: MESSAGE` on one line of stderr (the
    default adds the source line on a second)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f'timm-sila {command}: warning: {" ".join(str(message).split())}', file=file or sys.stderr)
    return show


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {" ".join(message.split())} (see {self.prog} --help)\n')


# --- argument types: checked at parse time, so a bad value is a usage error before anything is read or written ---
def _path(text: str) -> str:
    """A file or folder argument: refused unless non-empty valid UTF-8 (paths are printed and written in JSON)."""
    if not text:
        raise argparse.ArgumentTypeError('empty path')
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f'path {os.fsencode(text)!r} is not valid UTF-8; rename it or pass a UTF-8 path') from None
    return text


def _path_obj(text: str) -> Path:
    return Path(_path(text))


def _number(kind: type, minimum: float, what: str):
    """An argparse type: a finite `kind` (int or float) >= `minimum`, else a usage error saying what was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}') from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
        return value
    return parse


_positive_int = _number(int, 1, 'an integer >= 1')
_non_negative_int = _number(int, 0, 'an integer >= 0')
_non_negative_float = _number(float, 0.0, 'a finite number >= 0')


def _taps(text: str) -> List:
    """'layer3,layer1' or '3,1' -> ['layer3', 'layer1'] / [3, 1] (module names or feature_info indices)."""
    taps = [int(t) if t.strip().lstrip('-').isdigit() else t.strip() for t in text.split(',') if t.strip()]
    if not taps:
        raise argparse.ArgumentTypeError(f'expected comma-separated stage names or indices, got {text!r}')
    return taps


class _ModelKwargs(argparse.Action):
    """KEY=VALUE items -> dict, each VALUE read as timm's train.py reads `--model-kwargs` (utils.ParseKwargs):
    a Python literal when it is one (3, 0.5, True, None, ['layer3', 'layer1']), else the string itself."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            if not item:
                continue
            key, sep, value = item.partition('=')
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f'expected KEY=VALUE items with KEY a Python name, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _debug_option(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    parser.add_argument('--debug', action='store_true', default=default, help='show the full traceback on errors')


def _model_kwargs_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=_ModelKwargs, metavar='KEY=VALUE',
                        help='extra create_model kwargs; each VALUE is a Python literal when it is one, else a '
                             "string (as timm's train.py reads --model-kwargs)")


def _sila_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--num-classes', type=_positive_int, default=None, help='number of classes N')
    parser.add_argument('--img-size', type=_positive_int, default=None,
                        help='input size (model kwarg for architectures that take one, e.g. ViT; input_size in '
                             'the exported config)')
    parser.add_argument('--sets', type=_positive_int, default=None, help='number of output sets M (sila_sets)')
    parser.add_argument('--taps', type=_taps, default=None,
                        help='comma-separated tap stages, set 1 first (module names or feature_info indices)')
    parser.add_argument('--head', default=None, help='auxiliary head type (sila_head)')
    _model_kwargs_option(parser)


# --- subcommands ------------------------------------------------------------------------------------------------
def add_strip_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'strip', help='keep one branch of a trained SilaNet, written as timm model.safetensors + config.json',
        description='Keep one output set of a trained SilaNet (paper Sec 2.3) and write it in timm\'s hub format. '
                    'Branch 0 loads with plain timm; branch k >= 1 after `import timm_sila`.')
    p.add_argument('checkpoint', type=_path,
                   help='timm train.py checkpoint (.pth.tar), state_dict (.pth) or .safetensors')
    p.add_argument('--branch', type=_non_negative_int, required=True,
                   help='set to keep: 0 = base model, k >= 1 = head k')
    p.add_argument('--out', type=_path, required=True, help='output folder')
    p.add_argument('--model', default=None, help='SilaNet name (e.g. sila_resnet18) when the file does not say')
    _sila_options(p)
    p.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    p.add_argument('--force', action='store_true',
                   help='replace the files an earlier strip wrote in --out (refused if it holds any other file; '
                        'never the checkpoint or --metrics)')
    p.add_argument('--metrics', type=_path_obj, default=None,
                   help='`timm-sila eval --json` result: its metrics for this branch go into the model card')
    p.add_argument('--no-card', dest='card', action='store_false', help='do not write the README.md model card')
    p.add_argument('--json', action='store_true', help='print machine-readable JSON')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.strip:run')
    return p


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'info', help='taps, params, size and compression ratio of every branch (paper Table 3)',
        description='Per branch: parameter count, fp32 size in MB (1 MB = 2^20 bytes) and compression ratio '
                    'CR = 1 - params(branch)/params(base); plus the train-time size of the whole SilaNet.')
    p.add_argument('model', help='sila_<arch> or <arch>, e.g. sila_resnet18')
    _sila_options(p)
    p.add_argument('--json', action='store_true', help='print machine-readable JSON')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.info:run')
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'eval', help='per-branch top-1..5, loss, ensemble and params/MB/CR on an ImageFolder split',
        description='Evaluate every branch of a trained SilaNet (or a stripped branch folder / plain timm model) '
                    'on an ImageFolder split in one pass. The data config (input size, interpolation, mean, std, '
                    'crop) is resolved from the checkpoint\'s train.py args as train.py resolves it.')
    p.add_argument('--model', required=True,
                   help='sila_<arch> (with --checkpoint), a plain timm arch (with --checkpoint), or '
                        'local-dir:DIR for a folder written by `timm-sila strip`')
    p.add_argument('--checkpoint', type=_path, default=None,
                   help='checkpoint file (timm train.py .pth.tar, .pth, .safetensors)')
    p.add_argument('--data-dir', type=_path, required=True, help='ImageFolder root (with the split as a sub-folder)')
    p.add_argument('--split', type=_path, default='test', help='sub-folder of --data-dir to evaluate (default: test)')
    p.add_argument('--num-classes', type=_positive_int, default=None,
                   help='number of classes (default: from checkpoint)')
    p.add_argument('--img-size', type=_positive_int, default=None,
                   help='input size (default: from checkpoint / config)')
    p.add_argument('--batch-size', type=_positive_int, default=256)
    p.add_argument('--workers', type=_non_negative_int, default=2, help='data loader worker processes')
    p.add_argument('--ema', action='store_true', help="evaluate the checkpoint's EMA weights")
    p.add_argument('--device', default=None, help='torch device, e.g. cpu, cuda, cuda:1 (default: cuda when '
                                                  'available, else cpu)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.eval:run')
    return p


def add_exit_curve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'exit-curve', help='accuracy vs compute / throughput of early exits over a threshold sweep',
        description='Calibrate per-branch temperatures on a held-out split, sweep the exit threshold, and report '
                    'accuracy, compute fraction and measured throughput on the evaluation split.')
    p.add_argument('--model', required=True, help='sila_<arch>')
    p.add_argument('--checkpoint', type=_path, required=True, help='checkpoint of the full SilaNet')
    p.add_argument('--data-dir', type=_path, required=True, help='ImageFolder root')
    p.add_argument('--split', type=_path, default='test', help='evaluation sub-folder (default: test)')
    p.add_argument('--calib-split', type=_path, required=True,
                   help='held-out sub-folder for calibration (never the test split)')
    p.add_argument('--calib-limit', type=_positive_int, default=5000, help='at most this many calibration images')
    p.add_argument('--num-classes', type=_positive_int, default=None)
    p.add_argument('--img-size', type=_positive_int, default=None)
    p.add_argument('--batch-size', type=_positive_int, default=256)
    p.add_argument('--ema', action='store_true')
    p.add_argument('--policy', choices=('confidence', 'entropy'), default='confidence')
    p.add_argument('--points', type=_positive_int, default=12, help='thresholds in the sweep')
    p.add_argument('--max-drop', type=_non_negative_float, default=1.0,
                   help='accuracy points the chosen threshold may lose')
    p.add_argument('--png', type=_path_obj, default=None, help='write the curve here (needs matplotlib)')
    p.add_argument('--save', type=_path_obj, default=None, help='save the calibrated EarlyExit (.safetensors)')
    p.add_argument('--force', action='store_true',
                   help='replace an existing --png / --save file (never the checkpoint or an image folder)')
    p.add_argument('--json', action='store_true')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.exit_curve:run')
    return p


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'export', help='one branch as ONNX (checked with onnxruntime) or torch.export .pt2',
        description='Export one branch (0 = the base model, k >= 1 = backbone up to tap k + head k) with a dynamic '
                    'batch dimension (and dynamic height and width with --dynamic-size), reload the file '
                    '(onnxruntime / torch.export.load), and compare it with the PyTorch model on random batches; past '
                    'the tolerance the export fails and nothing is written. ONNX is written by torch.onnx\'s dynamo '
                    'exporter, or by its TorchScript exporter when dynamo fails (--exporter). ONNX needs pip install '
                    '"timm-sila[export]".')
    p.add_argument('source', type=_path, help='folder written by `timm-sila strip`, or a SilaNet checkpoint file')
    p.add_argument('--branch', type=_non_negative_int, default=None,
                   help='branch to export (required for a checkpoint; a folder holds one branch)')
    p.add_argument('--format', choices=('onnx', 'pt2'), default='onnx', help='onnx (default) or pt2 (torch.export)')
    p.add_argument('--out', type=_path, required=True, help='file to write, e.g. model.onnx')
    p.add_argument('--batch-size', type=_positive_int, default=2,
                   help='example batch (>= 2); the file is checked at this size and at 1')
    p.add_argument('--atol', type=_non_negative_float, default=None,
                   help='absolute tolerance on max |delta| (default: 1e-4 x max(1, max |logit|))')
    p.add_argument('--opset', type=_positive_int, default=18, help='ONNX opset (default 18)')
    p.add_argument('--dynamic-size', action='store_true',
                   help='make height and width dynamic too (models that take any input size; refused for fixed-size '
                        'ones); the file is also checked at a second size, 32 rows and 64 columns larger')
    p.add_argument('--exporter', choices=('auto', 'dynamo', 'torchscript'), default='auto',
                   help="ONNX exporter: auto (default: torch.onnx's dynamo exporter, then its TorchScript exporter "
                        'if dynamo fails), dynamo, or torchscript')
    p.add_argument('--model', default=None, help='SilaNet name (e.g. sila_resnet18) when the checkpoint does not say')
    _sila_options(p)
    p.add_argument('--ema', action='store_true', help="export the checkpoint's EMA weights")
    p.add_argument('--force', action='store_true', help='replace an existing --out file (never the source)')
    p.add_argument('--json', action='store_true', help='print the report as JSON')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.export:run')
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'bench', help='images/s and latency of every branch and the base, side by side (+ params/MB/CR, accuracy)',
        description='Time the base model and every branch in one run on one input batch: warm-up rounds, then '
                    'rounds that run each model once (starting at the next model each round); medians. A model '
                    'name (random weights) answers which branch is fast enough before training.')
    p.add_argument('source', type=_path,
                   help='SilaNet checkpoint, folder written by `timm-sila strip`, or a model name (sila_resnet18)')
    p.add_argument('--batch-size', type=_positive_int, default=16)
    p.add_argument('--threads', type=_positive_int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument('--runtime', choices=('torch', 'onnxruntime'), default='torch',
                   help='torch (default) or onnxruntime (exports each model to ONNX first, parity-checked)')
    p.add_argument('--warmup', type=_non_negative_int, default=3, help='untimed rounds (default 3)')
    p.add_argument('--repeats', type=_positive_int, default=20, help='timed rounds (default 20)')
    p.add_argument('--metrics', type=_path_obj, default=None, help='`timm-sila eval --json` output: adds top-1/top-5')
    p.add_argument('--device', default='cpu', help='torch device for --runtime torch (default cpu)')
    p.add_argument('--model', default=None, help='SilaNet name when the checkpoint does not say')
    _sila_options(p)
    p.add_argument('--ema', action='store_true', help="time the checkpoint's EMA weights (same speed)")
    p.add_argument('--json', action='store_true', help='print the result as JSON')
    _debug_option(p)
    p.set_defaults(handler='timm_sila_cli.bench:run')
    return p


SUBCOMMANDS: List[Callable] = [add_strip_parser, add_info_parser, add_eval_parser, add_exit_curve_parser,
                               add_export_parser, add_bench_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='timm-sila', description='SilaNet tools for timm models.')
    _debug_option(parser, default=False)
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `timm-sila` with `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code
    module, _, name = args.handler.partition(':')
    handler = getattr(importlib.import_module(module), name)  # imports torch, timm and registers sila_* names
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warnings(args.command)
            return handler(args)
    except BAD_INPUT as e:
        if args.debug:
            raise
        print(f'timm-sila {args.command}: error: {error_line(e)}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'timm-sila {args.command}: interrupted', file=sys.stderr)
        return 130
