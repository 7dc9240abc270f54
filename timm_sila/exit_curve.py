"""Accuracy vs compute (and measured throughput) of a SilaNet's early exits over a threshold sweep.

Python: `exit_curve(model, calib_loader, eval_loader) -> dict`. CLI: `timm-sila exit-curve` (parser in
`timm_sila_cli`, handler `run_exit_curve`).
Temperatures and every threshold are derived from the calibration data only; the evaluation split is
only measured.
"""
import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from .early_exit import EarlyExit
from .exit_calibration import calibrate_temperatures, choose_threshold, choose_thresholds, simulate_exits
from .exit_policy import certainty, exit_score
from .model import SilaNet

__all__ = ['collect_branch_logits', 'exit_curve', 'format_curve', 'plot_curve', 'run_exit_curve']


@torch.no_grad()
def collect_branch_logits(model: SilaNet, loader: Iterable, device=None, progress: Optional[str] = None,
                          what: str = 'data'):
    """(logits (n, M, N) in set order, labels (n,), inputs kept for timing (first 4 batches)).

    progress: a label; when given, batches done are printed to stderr (first batch, then every 5 s, and the last).
    An empty loader is a ValueError naming `what`."""
    model.eval()
    outs, labels, kept = [], [], []
    total = len(loader) if hasattr(loader, '__len__') else None
    shown = time.monotonic()
    images = 0
    for i, (x, y) in enumerate(loader, 1):
        x = x.to(device) if device is not None else x
        outs.append(torch.stack(model.forward_branches(x), 1).float().cpu())
        labels.append(y.cpu())
        images += len(y)
        if len(kept) < 4:
            kept.append(x)
        if progress and (i == 1 or i == total or time.monotonic() - shown >= 5.0):
            print(f'{progress}: {i}/{total if total is not None else "?"} batches ({images} images)',
                  file=sys.stderr, flush=True)
            shown = time.monotonic()
    if not images:
        raise ValueError(f'The {what} set is empty: exit-curve needs at least one image in it.')
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


def _sweep_thresholds(logits: torch.Tensor, labels: torch.Tensor, temps: List[float], seg: List[int],
                      policy: str, points: int, chosen: float) -> List[float]:
    """`points` thresholds with distinct calibration outcomes (exits per set), `chosen` among them.

    A sample leaves at some exit iff its best score over the exits clears the threshold, so thresholds at evenly
    spaced quantiles of that best score spread the fraction of early answers evenly. The quantile nearest to
    `chosen` is replaced by it; thresholds whose calibration outcome repeats one already taken are skipped and
    replaced from a finer quantile grid. Fewer than `points` only when the calibration data has fewer distinct
    operating points."""
    sets = logits.shape[1]
    scores = torch.stack([exit_score(logits[:, k] / temps[k], policy) for k in range(1, sets)], 1)
    best = certainty(certainty(scores, policy).amax(1), policy).double()  # each sample's most certain exit score

    def at(level: float) -> float:
        return float(torch.quantile(best, level))

    def outcome(t: float) -> tuple:  # exits are nested in the threshold: equal counts per set = equal decisions
        return tuple(simulate_exits(logits, labels, [t] * (sets - 1), temps, seg, policy)['exits'].values())

    levels = torch.linspace(0.0, 1.0, points).tolist()
    nearest = min(levels, key=lambda q: abs(at(q) - chosen))
    taken = {outcome(chosen): (nearest, chosen)}
    for q in levels:
        if q != nearest:
            taken.setdefault(outcome(at(q)), (q, at(q)))
    spare = sorted(set(torch.linspace(0.0, 1.0, 8 * points + 1).tolist()) - set(levels))
    while len(taken) < points and spare:  # fill in from the finer level farthest from those taken
        q = max(spare, key=lambda c: min(abs(c - used) for used, _ in taken.values()))
        spare.remove(q)
        taken.setdefault(outcome(at(q)), (q, at(q)))
    return sorted((t for _, t in taken.values()), key=lambda t: certainty(t, policy))  # most early answers first


@torch.no_grad()
def exit_curve(model: SilaNet, calib_loader: Iterable, eval_loader: Iterable, policy: str = 'confidence',
               points: int = 12, max_drop: float = 1.0, timed: int = 4, repeats: int = 3, device=None,
               progress: bool = False) -> Dict:
    """Threshold sweep of EarlyExit(model): `points` rows (fewer only if the calibration data has fewer distinct
    operating points) of threshold, eval accuracy (%), compute fraction, exits per set and, for `timed` rows
    spread over the sweep plus the chosen one, measured throughput relative to the base model (same batches,
    alternated). The operating point meeting `max_drop` accuracy points on the calibration data is one of the
    rows, marked 'chosen'. 'per_exit' is the operating point with one threshold per exit (`choose_thresholds`,
    same constraint, calibration data), measured the same way. Temperatures are fitted on the calibration data
    within `TEMPERATURE_BOUNDS`; any that had to be clamped is warned about and listed in 'warnings'.
    progress: print phases and batches to stderr."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f'points must be an integer >= 1, got {points!r}.')
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) \
            or max_drop < 0:
        raise ValueError(f'max_drop must be a finite number of accuracy points >= 0, got {max_drop!r}.')
    if timed < 0 or repeats < 1:
        raise ValueError(f'timed must be >= 0 and repeats >= 1, got timed={timed}, repeats={repeats}.')
    def label(split: str) -> Optional[str]:
        return f'exit-curve: {split} logits' if progress else None

    calib_logits, calib_labels, _ = collect_branch_logits(model, calib_loader, device, label('calibration'),
                                                          what='calibration')
    eval_logits, eval_labels, batches = collect_branch_logits(model, eval_loader, device, label('evaluation'),
                                                              what='evaluation')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        temps = calibrate_temperatures(calib_logits, calib_labels)
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
    ee = EarlyExit(model, policy=policy, temperatures=temps, input_size=tuple(batches[0].shape[1:]))
    seg = ee.segment_macs(batches[0])
    chosen = choose_threshold(calib_logits, calib_labels, temps, seg, policy=policy, max_drop=max_drop)
    thresholds = _sweep_thresholds(calib_logits, calib_labels, temps, seg, policy, points, chosen['threshold'])
    base_acc = 100.0 * float((eval_logits[:, 0].argmax(-1) == eval_labels).float().mean())
    rows = []
    for t in thresholds:
        row = simulate_exits(eval_logits, eval_labels, [t] * (model.sets - 1), temps, seg, policy)
        rows.append(dict(row, threshold=t, drop=base_acc - row['accuracy'], chosen=t == chosen['threshold']))
    per = choose_thresholds(calib_logits, calib_labels, temps, seg, policy=policy, max_drop=max_drop)
    per_exit = dict(simulate_exits(eval_logits, eval_labels, per['thresholds'], temps, seg, policy),
                    thresholds=per['thresholds'], calib_compute=per['compute'])
    per_exit['drop'] = base_acc - per_exit['accuracy']
    chosen_at = next(i for i, r in enumerate(rows) if r['chosen'])
    spread = torch.linspace(0, len(rows) - 1, timed).round().long().tolist() if timed > 0 else []
    to_time = [rows[i] for i in sorted({chosen_at, *spread})] + [per_exit]
    if progress:
        print(f'exit-curve: timing {len(to_time)} operating points against the base model', file=sys.stderr,
              flush=True)
    for row in to_time:
        ee.set_thresholds(row.get('thresholds', row.get('threshold')))
        ee(batches[0])  # verification and warm-up outside the timing
        t_exit, t_base = [], []
        for _ in range(repeats):  # alternate A and B so machine noise hits both
            t_exit.append(_time(ee, batches, 1))
            t_base.append(_time(model.base, batches, 1))
        row['speedup'] = statistics.median(t_base) / statistics.median(t_exit)
        row['measured_compute'] = ee(torch.cat(batches)).compute
    return dict(policy=policy, temperatures=temps, segment_macs=seg, base_accuracy=base_acc,
                calib_samples=len(calib_labels), eval_samples=len(eval_labels), max_drop=max_drop, rows=rows,
                batch_size=len(batches[0]), per_exit=per_exit, warnings=notes)


def _threshold_texts(values: List[float]) -> List[str]:
    """Thresholds printed with the fewest decimals (4 to 12) that tell every row apart."""
    for digits in range(4, 13):
        texts = [f'{v:.{digits}f}' for v in values]
        if len(set(texts)) == len(texts):
            break
    return texts


def format_curve(result: Dict) -> str:
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


# --- CLI handler: timm-sila exit-curve (parser: timm_sila_cli.add_exit_curve_parser) --------------------------
def _loader(root: Path, model: SilaNet, data_config: Dict, batch_size: int, limit: Optional[int]):
    """The image folder `root` as `timm_sila.data.eval_loader` reads it (classes, channels and memory checked)."""
    from .data import eval_loader
    from .sizes import MemoryBoundError
    try:
        return eval_loader(root, model, data_config, batch_size, workers=2, limit=limit)
    except MemoryBoundError as e:
        raise ValueError(e.message('--batch-size', '--img-size')) from e


def run_exit_curve(args: argparse.Namespace) -> int:
    """Progress and warnings go to stderr, one line each; stdout holds only the table or the JSON document."""
    from .evaluation import _data_config, _load_model
    if args.calib_split == args.split:
        raise ValueError('--calib-split must differ from --split: thresholds are never chosen on the test data.')
    if args.calib_limit is not None and args.calib_limit < 1:
        raise ValueError(f'--calib-limit must be >= 1, got {args.calib_limit}.')
    if not math.isfinite(args.max_drop) or args.max_drop < 0:
        raise ValueError(f'--max-drop must be a finite number >= 0, got {args.max_drop}.')
    for split in (args.split, args.calib_split):
        if not (Path(args.data_dir) / split).is_dir():
            raise FileNotFoundError(f'{Path(args.data_dir) / split} is not a folder (ImageFolder layout DIR/SPLIT/<class>/).')
    model, overrides = _load_model(args)
    if not isinstance(model, SilaNet) or model.stripped:
        raise ValueError('exit-curve needs a full SilaNet checkpoint (all branches); a stripped folder has one.')
    data_config = _data_config(model, overrides, args.img_size)
    calib = _loader(Path(args.data_dir) / args.calib_split, model, data_config, args.batch_size, args.calib_limit)
    evaluation = _loader(Path(args.data_dir) / args.split, model, data_config, args.batch_size, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = exit_curve(model, calib, evaluation, policy=args.policy, points=args.points, max_drop=args.max_drop,
                            progress=True)
    for w in caught:
        print(f'timm-sila exit-curve: warning: {" ".join(str(w.message).split())}', file=sys.stderr)
    if args.png:
        result['png'] = str(plot_curve(result, args.png))
    if args.save:
        chosen = next(r for r in result['rows'] if r['chosen'])
        EarlyExit(model, thresholds=chosen['threshold'], policy=args.policy, temperatures=result['temperatures'],
                  input_size=data_config['input_size']).save(args.save)
        result['saved'] = str(args.save)
    print(json.dumps(result, indent=2) if args.json else format_curve(result))
    return 0
