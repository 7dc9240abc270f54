"""`timm-sila bench`: images/s and latency of the base and every branch, side by side, with params / MB / CR."""
import argparse
from typing import Any, Dict

from timm_sila.measure.bench import bench_branches

from ._common import checkpoint_options, print_json, resolve_device


def _rate(images_per_s: float) -> str:
    return f'{images_per_s:,.0f}' if images_per_s >= 100 else f'{images_per_s:.3g}'


def format_bench(result: Dict[str, Any]) -> str:
    """The benchmark as a table (one row per model, branch 0 = the base), with a header line of the setup."""
    has_acc = any('top1' in r for r in result['rows'])
    head = ['branch', 'exit', 'params', 'MB', 'CR'] + (['top1'] if has_acc else []) + [
        'latency ms', 'images/s', 'speed-up']
    lines = []
    for r in result['rows']:
        label = f"{r['branch']}{' (base)' if r['branch'] == 0 else ''}{' *' if r['weights'] == 'random' else ''}"
        acc = [f"{r['top1']:.2f}" if 'top1' in r else '-'] if has_acc else []
        lines.append([label, str(r['exit']), f"{r['params']:,}", f"{r['size_mb']:.2f}", f"{100 * r['cr']:.2f}%"]
                     + acc + [f"{r['latency_ms']:.2f} ± {r['latency_ms_iqr'] / 2:.2f}", _rate(r['images_per_s']),
                              f"{r['speedup']:.2f}x"])
    widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(head)]
    fmt = lambda r: '  '.join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
    out = [f"{result['source']}: {result['runtime']} on {result['device']}, {result['threads']} thread(s), batch "
           f"{result['batch_size']} x {tuple(result['input_size'])}, median of {result['repeats']} rounds after "
           f"{result['warmup']} warm-up, models alternating",
           fmt(head), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines]
    notes = ['latency = median time per batch (± half the interquartile range); CR = 1 - params/params(base); '
             'MB = fp32 params / 2**20']
    if any(r['weights'] == 'random' for r in result['rows']):
        notes.append('* random weights (speed and size only)')
    return '\n'.join(out + notes)


def run(args: argparse.Namespace) -> int:
    """Times every branch of --source in one run; prints the table (or the JSON result)."""
    result = bench_branches(args.source, img_size=args.img_size, batch_size=args.batch_size, threads=args.threads,
                            runtime=args.runtime, warmup=args.warmup, repeats=args.repeats, metrics=args.metrics,
                            device=resolve_device(args.device), **checkpoint_options(args))
    if args.json:
        print_json(result)
    else:
        print(format_bench(result))
    return 0
