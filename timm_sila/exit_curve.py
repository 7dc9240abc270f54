"""Accuracy vs compute (and measured throughput) of a SilaNet's early exits over a threshold sweep.

Python: `exit_curve(model, calib_loader, eval_loader) -> dict`. CLI: `timm-sila exit-curve`.
Temperatures and every threshold are derived from the calibration data only; the evaluation split is
only measured.
"""
import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

from .early_exit import EarlyExit, _score, calibrate_temperatures, choose_threshold, simulate_exits
from .model import SilaNet

__all__ = ['collect_branch_logits', 'exit_curve', 'format_curve', 'add_exit_curve_parser', 'run_exit_curve']


@torch.no_grad()
def collect_branch_logits(model: SilaNet, loader: Iterable, device=None):
    """(logits (n, M, N) in set order, labels (n,), inputs kept for timing (first 4 batches))."""
    model.eval()
    outs, labels, kept = [], [], []
    for x, y in loader:
        x = x.to(device) if device is not None else x
        outs.append(torch.stack(model.forward_branches(x), 1).float().cpu())
        labels.append(y.cpu())
        if len(kept) < 4:
            kept.append(x)
    return torch.cat(outs), torch.cat(labels), kept


def _time(fn, batches: List[torch.Tensor], repeats: int) -> float:
    """Median seconds per image of fn over the batches."""
    per_image = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in batches:
            fn(x)
        per_image.append((time.perf_counter() - start) / sum(len(x) for x in batches))
    return statistics.median(per_image)


@torch.no_grad()
def exit_curve(model: SilaNet, calib_loader: Iterable, eval_loader: Iterable, policy: str = 'confidence',
               points: int = 12, max_drop: float = 1.0, timed: int = 4, repeats: int = 3, device=None) -> Dict:
    """Threshold sweep of EarlyExit(model): rows of threshold, eval accuracy (%), compute fraction, exits per
    set and, for `timed` rows spread over the sweep plus the chosen one, measured throughput relative to the base model (same batches, alternated).
    The operating point meeting `max_drop` accuracy points on the calibration data is marked 'chosen'."""
    calib_logits, calib_labels, _ = collect_branch_logits(model, calib_loader, device)
    eval_logits, eval_labels, batches = collect_branch_logits(model, eval_loader, device)
    temps = calibrate_temperatures(calib_logits, calib_labels)
    ee = EarlyExit(model, policy=policy, temperatures=temps)
    seg = ee.segment_macs(batches[0])
    chosen = choose_threshold(calib_logits, calib_labels, temps, seg, policy=policy, max_drop=max_drop)
    scores = torch.cat([_score(calib_logits[:, k] / temps[k], policy) for k in range(1, model.sets)])
    grid = torch.quantile(scores, torch.linspace(0.0, 1.0, points)).tolist()
    grid = [-g for g in grid] if policy == 'entropy' else grid
    thresholds = sorted(set(grid + [chosen['threshold']]), reverse=policy == 'entropy')
    base_acc = 100.0 * float((eval_logits[:, 0].argmax(-1) == eval_labels).float().mean())
    rows = []
    for t in thresholds:
        row = simulate_exits(eval_logits, eval_labels, [t] * (model.sets - 1), temps, seg, policy)
        rows.append(dict(row, threshold=t, drop=base_acc - row['accuracy'], chosen=t == chosen['threshold']))
    chosen_at = next(i for i, r in enumerate(rows) if r['chosen'])
    spread = torch.linspace(0, len(rows) - 1, timed).round().long().tolist() if timed > 0 else []
    for row in [rows[i] for i in sorted({chosen_at, *spread})]:
        ee.set_thresholds(row['threshold'])
        ee(batches[0])  # verification and warm-up outside the timing
        t_exit, t_base = [], []
        for _ in range(repeats):  # alternate A and B so machine noise hits both
            t_exit.append(_time(ee, batches, 1))
            t_base.append(_time(model.base, batches, 1))
        row['speedup'] = statistics.median(t_base) / statistics.median(t_exit)
        row['measured_compute'] = ee(torch.cat(batches)).compute
    return dict(policy=policy, temperatures=temps, segment_macs=seg, base_accuracy=base_acc,
                calib_samples=len(calib_labels), eval_samples=len(eval_labels), max_drop=max_drop, rows=rows,
                batch_size=len(batches[0]))


def format_curve(result: Dict) -> str:
    head = f"{'threshold':>10}  {'acc %':>7}  {'drop':>6}  {'compute':>8}  {'speed-up':>8}  exits by set"
    lines = [head, '-' * len(head)]
    for r in result['rows']:
        speed = f"{r['speedup']:.2f}x" if 'speedup' in r else '-'
        exits = ' '.join(f'{k}:{v}' for k, v in r['exits'].items())
        mark = '  <- chosen on calibration data' if r['chosen'] else ''
        lines.append(f"{r['threshold']:>10.4f}  {r['accuracy']:>7.2f}  {r['drop']:>6.2f}  {r['compute']:>8.3f}  "
                     f"{speed:>8}  {exits}{mark}")
    lines.append(f"base (set 0) accuracy {result['base_accuracy']:.2f} %; compute = backbone MACs / base MACs; "
                 f"speed-up = measured throughput vs base, batch {result['batch_size']}; temperatures "
                 f"{[round(t, 3) for t in result['temperatures']]}")
    return '\n'.join(lines)


def plot_curve(result: Dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result['rows']
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r['compute'] for r in rows], [r['accuracy'] for r in rows], 'o-', label='early exit (sweep)')
    speed = [r for r in rows if 'speedup' in r]
    ax.plot([1 / r['speedup'] for r in speed], [r['accuracy'] for r in speed], 's', label='1 / measured speed-up')
    ax.axhline(result['base_accuracy'], color='gray', ls='--', label='base model')
    ax.set_xlabel('compute fraction (backbone MACs)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- CLI: timm-sila exit-curve ---------------------------------------------------------------------------
def add_exit_curve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'exit-curve', help='accuracy vs compute / throughput of early exits over a threshold sweep',
        description='Calibrate per-branch temperatures on a held-out split, sweep the exit threshold, and report '
                    'accuracy, compute fraction and measured throughput on the evaluation split.')
    p.add_argument('--model', required=True, help='sila_<arch>')
    p.add_argument('--checkpoint', required=True, help='checkpoint of the full SilaNet')
    p.add_argument('--data-dir', required=True, help='ImageFolder root')
    p.add_argument('--split', default='test', help='evaluation sub-folder (default: test)')
    p.add_argument('--calib-split', required=True, help='held-out sub-folder for calibration (never the test split)')
    p.add_argument('--calib-limit', type=int, default=5000, help='at most this many calibration images')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--ema', action='store_true')
    p.add_argument('--policy', choices=('confidence', 'entropy'), default='confidence')
    p.add_argument('--points', type=int, default=12, help='thresholds in the sweep')
    p.add_argument('--max-drop', type=float, default=1.0, help='accuracy points the chosen threshold may lose')
    p.add_argument('--png', type=Path, default=None, help='write the curve here (needs matplotlib)')
    p.add_argument('--save', type=Path, default=None, help='save the calibrated EarlyExit (.safetensors)')
    p.add_argument('--json', action='store_true')
    p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help='full traceback on errors')
    p.set_defaults(handler=run_exit_curve)
    return p


def _loader(root: Path, transform, batch_size: int, limit: Optional[int]):
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(str(root), transform=transform)
    if limit is not None and limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
        dataset = torch.utils.data.Subset(dataset, order.tolist())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=2)


def run_exit_curve(args: argparse.Namespace) -> int:
    from timm.data import create_transform
    from .evaluation import _data_config, _load_model
    if args.calib_split == args.split:
        raise ValueError('--calib-split must differ from --split: thresholds are never chosen on the test data.')
    for split in (args.split, args.calib_split):
        if not (Path(args.data_dir) / split).is_dir():
            raise FileNotFoundError(f'{Path(args.data_dir) / split} is not a folder (ImageFolder layout DIR/SPLIT/<class>/).')
    model, overrides = _load_model(args)
    if not isinstance(model, SilaNet) or model.stripped:
        raise ValueError('exit-curve needs a full SilaNet checkpoint (all branches); a stripped folder has one.')
    transform = create_transform(**_data_config(model, overrides, args.img_size), is_training=False)
    calib = _loader(Path(args.data_dir) / args.calib_split, transform, args.batch_size, args.calib_limit)
    evaluation = _loader(Path(args.data_dir) / args.split, transform, args.batch_size, None)
    result = exit_curve(model, calib, evaluation, policy=args.policy, points=args.points, max_drop=args.max_drop)
    if args.png:
        result['png'] = str(plot_curve(result, args.png))
    if args.save:
        chosen = next(r for r in result['rows'] if r['chosen'])
        EarlyExit(model, thresholds=chosen['threshold'], policy=args.policy,
                  temperatures=result['temperatures']).save(args.save)
        result['saved'] = str(args.save)
    print(json.dumps(result, indent=2) if args.json else format_curve(result))
    return 0
