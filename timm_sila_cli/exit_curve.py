"""`timm-sila exit-curve`: accuracy vs compute and measured throughput of early exits over a threshold sweep, with
the verdict whether early exit pays. Progress and warnings go to stderr, one line each; stdout holds only the
table or the JSON document."""
import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List

from timm_sila.data.config import resolve_data_config
from timm_sila.data.folder import eval_loader
from timm_sila.exits.curve import exit_curve, plot_curve
from timm_sila.exits.early_exit import EarlyExit
from timm_sila.io.atomic import atomic_write_file, check_output_file
from timm_sila.model import SilaNet

from ._common import model_from_args, print_json


def _threshold_texts(values: List[float]) -> List[str]:
    """Thresholds printed with the fewest decimals (4 to 12) that tell every row apart."""
    for digits in range(4, 13):
        texts = [f'{v:.{digits}f}' for v in values]
        if len(set(texts)) == len(texts):
            break
    return texts


def format_curve(result: Dict) -> str:
    """The `exit_curve` result as a table (one row per threshold), then the per-exit point, one line per stripped
    branch, the legend and, last, 'verdict: ' and the verdict's message."""
    texts = _threshold_texts([r['threshold'] for r in result['rows']])
    width = max([len('threshold')] + [len(t) for t in texts])
    head = f"{'threshold':>{width}}  {'acc %':>7}  {'drop':>6}  {'compute':>8}  {'speed-up':>8}  exits by set"
    lines = [head, '-' * len(head)]
    for r, text in zip(result['rows'], texts):
        speed = f"{r['speedup']:.2f}x" if 'speedup' in r else '-'
        exits = ' '.join(f'{k}:{v}' for k, v in r['exits'].items())
        mark = '  <- chosen on calibration data' if r['chosen'] else ''
        lines.append(f"{text:>{width}}  {r['accuracy']:>7.2f}  {r['drop']:>6.2f}  {r['compute']:>8.3f}  "
                     f"{speed:>8}  {exits}{mark}")
    per = result.get('per_exit')
    if per:
        lines.append(f"per-exit thresholds {[round(t, 4) for t in per['thresholds']]} (exit order, chosen on "
                     f"calibration data): acc {per['accuracy']:.2f} %, drop {per['drop']:.2f}, compute "
                     f"{per['compute']:.3f}, speed-up {per['speedup']:.2f}x")
    for b in result.get('branches', []):
        drops = f"calibration drop {b['calib_drop']:.2f}" + (f", drop {b['drop']:.2f}" if 'drop' in b else '') + (
            f", compute {b['compute']:.3f}" if 'compute' in b else '')
        speed = (f"speed-up {b['speedup']:.2f}x" if 'speedup' in b else f"not timed: {b['error']}" if 'error' in b
                 else f"not timed: beyond max drop {result['max_drop']:g}")
        lines.append(f"stripped branch {b['branch']}: {drops}, {speed}")
    lines.append(f"base (set 0) accuracy {result['base_accuracy']:.2f} %; compute = backbone MACs / base MACs; "
                 f"speed-up = measured throughput vs base, batch {result['batch_size']}; temperatures "
                 f"{[round(t, 3) for t in result['temperatures']]}")
    if 'verdict' in result:
        lines.append(f"verdict: {result['verdict']['message']}")
    return '\n'.join(lines)


def _curve_inputs(args: argparse.Namespace) -> List[Path]:
    """What exit-curve reads: its outputs may be none of these, nor lie in the image folders."""
    return [Path(args.checkpoint), Path(args.data_dir) / args.split, Path(args.data_dir) / args.calib_split]


def _check_curve_outputs(args: argparse.Namespace) -> List[Path]:
    """--png / --save: each a new file (or, with --force, a file to replace), neither the other nor an input."""
    outputs = [p for p in (args.png, args.save) if p is not None]
    if len(outputs) == 2 and os.path.realpath(args.png) == os.path.realpath(args.save):
        raise ValueError(f'--png and --save both name {args.save}; give each its own file.')
    for path in outputs:
        check_output_file(path, args.force, _curve_inputs(args))
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401  -- optional dependency: checked before the slow work
        except ImportError:
            raise ValueError('--png needs matplotlib: pip install matplotlib, or leave out --png.') from None
    return outputs


def run(args: argparse.Namespace) -> int:
    """Calibrates on --calib-split, sweeps thresholds, measures on --split; prints the table (or JSON), and writes
    --png / --save when asked."""
    if args.calib_split == args.split:
        raise ValueError('--calib-split must differ from --split: thresholds are never chosen on the test data.')
    for split in (args.split, args.calib_split):
        if not (Path(args.data_dir) / split).is_dir():
            raise FileNotFoundError(f'{Path(args.data_dir) / split} is not a folder (ImageFolder layout '
                                    f'DIR/SPLIT/<class>/).')
    outputs = _check_curve_outputs(args)  # before the slow part; the writers check again at the end
    model, data_args = model_from_args(args)
    if not isinstance(model, SilaNet) or model.stripped:
        raise ValueError('exit-curve needs a full SilaNet checkpoint (all branches); a stripped folder has one.')
    data_config = resolve_data_config(model, data_args, args.img_size)
    calib = eval_loader(Path(args.data_dir) / args.calib_split, model, data_config, args.batch_size, workers=2,
                        limit=args.calib_limit)
    evaluation = eval_loader(Path(args.data_dir) / args.split, model, data_config, args.batch_size, workers=2)
    result = exit_curve(model, calib, evaluation, policy=args.policy, points=args.points, max_drop=args.max_drop,
                        progress=lambda line: print(f'exit-curve: {line}', file=sys.stderr, flush=True))
    for path in outputs:
        check_output_file(path, args.force, _curve_inputs(args))
    if args.png:
        atomic_write_file(args.png, lambda tmp: plot_curve(result, tmp), overwrite=args.force,
                          sources=_curve_inputs(args))
        result['png'] = str(args.png)
    if args.save:
        chosen = next(r for r in result['rows'] if r['chosen'])
        EarlyExit(model, thresholds=chosen['threshold'], policy=args.policy, temperatures=result['temperatures'],
                  input_size=data_config['input_size']).save(args.save, overwrite=args.force)
        result['saved'] = str(args.save)
    if args.json:
        print_json(result)
    else:
        print(format_curve(result))
    return 0
