"""Accuracy vs compute (and measured throughput) of a SilaNet's early exits over a threshold sweep.

`exit_curve(model, calib_loader, eval_loader) -> dict`; the command line's `timm-sila exit-curve` prints it as a
table. Temperatures and every threshold are derived from the calibration data only; the evaluation split is
only measured.

Compute fractions are MAC counts, not time: routing has a per-batch cost and early layers are often memory-bound,
so a point that saves MACs can still be slower than the base model. `exit_curve` therefore measures throughput
against the base model and gives a verdict (`exit_verdict`): whether any operating point within `max_drop` is
faster than the base model, and which stripped branch (`timm_sila.ship.strip.branch_model`) is the fastest within the
same drop. `measure_speedup` times any model (an `EarlyExit` included) against its base the same way.
"""
import functools
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from timm_sila._checks import finite_float, require_int, short
from timm_sila.model import SilaNet
from timm_sila.ship.strip import branch_model
from .calibration import calibrate_temperatures, choose_threshold, choose_thresholds, exit_table, simulate_table
from .early_exit import EarlyExit
from .policy import certainty

__all__ = ['collect_branch_logits', 'exit_curve', 'exit_verdict', 'measure_branches', 'measure_speedup', 'plot_curve',
           'SlowerThanBaseWarning']

Progress = Optional[Callable[[str], None]]


class SlowerThanBaseWarning(UserWarning):
    """The early-exit operating point chosen on the calibration data is measured no faster than the base model
    (or lets no sample leave early): an EarlyExit at that point does not pay for its routing."""


@torch.no_grad()
def collect_branch_logits(model: SilaNet, loader: Iterable, device=None, progress: Progress = None,
                          what: str = 'data'):
    """(logits (n, M, N) in set order, labels (n,), inputs kept for timing (first 4 batches)).

    progress: called with a line '<what> logits: i/n batches (k images)' for the first batch, then every 5 s, and
    the last. An empty loader is a ValueError naming `what`."""
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
        if progress is not None and (i == 1 or i == total or time.monotonic() - shown >= 5.0):
            progress(f'{what} logits: {i}/{total if total is not None else "?"} batches ({images} images)')
            shown = time.monotonic()
    if not images:
        raise ValueError(f'The {what} set is empty: exit-curve needs at least one image in it.')
    return torch.cat(outs), torch.cat(labels), kept


def _time(fn, batches: List[torch.Tensor]) -> float:
    """Seconds per image of one pass of fn over the batches (CUDA work is waited for before the clock stops)."""
    cuda = batches[0].is_cuda
    if cuda:
        torch.cuda.synchronize(batches[0].device)
    start = time.perf_counter()
    for x in batches:
        fn(x)
    if cuda:
        torch.cuda.synchronize(batches[0].device)
    return (time.perf_counter() - start) / sum(len(x) for x in batches)


@torch.no_grad()
def measure_speedup(model: Callable, base: Optional[Callable], batches: Sequence[torch.Tensor],
                    repeats: int = 3) -> float:
    """Measured throughput of `model` relative to `base` on the same `batches`: the median over `repeats` of (time
    of `base` / time of `model`) over all the batches. > 1 means `model` is faster.

    The two are timed alternately (model, base, model, base, ... `repeats` times each), each ratio from one
    back-to-back pair so that machine load hits both alike, after one warm-up call each on batches[0] (for an
    EarlyExit that call also runs its routing check for the input size). An `EarlyExit` with base=None is compared
    with its own SilaNet's base model. Both must be in eval mode. The ratio holds for this machine, batch size and
    thread count: measure where the model will run, and compare ratios from one run, never times from different
    runs. An empty `batches` or repeats < 1 is a ValueError.
    """
    if base is None:
        if not isinstance(model, EarlyExit):
            raise ValueError('measure_speedup needs a base model to compare with (base=None only for an EarlyExit).')
        base = model.model.base
    batches = [x for x in batches if len(x)]
    if not batches:
        raise ValueError('measure_speedup needs at least one non-empty batch to time.')
    repeats = require_int(repeats, 'repeats', 1)
    model(batches[0])
    base(batches[0])
    ratios = []
    for _ in range(repeats):  # one ratio per back-to-back pair cancels slow drifts in load; the median drops spikes
        t_model = _time(model, batches)
        ratios.append(_time(base, batches) / t_model)
    return statistics.median(ratios)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).float().mean())


@torch.no_grad()
def measure_branches(model: SilaNet, calib_logits: torch.Tensor, calib_labels: torch.Tensor,
                     batches: Sequence[torch.Tensor], max_drop: float, eval_logits: Optional[torch.Tensor] = None,
                     eval_labels: Optional[torch.Tensor] = None, segment_macs: Optional[Sequence[int]] = None,
                     repeats: int = 3) -> List[Dict]:
    """One entry per auxiliary branch k = 1 .. M-1 (set order): what shipping the stripped branch-k model instead of
    the base model would cost and gain.

    calib_logits / eval_logits: (n, M, N) branch logits in set order (`collect_branch_logits`). Each entry has
    'branch', 'calib_accuracy', 'calib_drop' (base head's calibration accuracy minus branch k's, in points),
    'within' (calib_drop <= max_drop: the selection uses the calibration data only), with eval logits 'accuracy' and
    'drop' (the same on the evaluation data, reported, never used to select), with segment_macs 'compute' (the
    branch's backbone MACs over the base model's), and, for branches within the drop, 'speedup':
    `measure_speedup(branch_model(model, k), model.base, batches, repeats)`, the model `strip --branch k` ships.
    A branch that cannot be stripped (no prune_intermediate_layers) gets 'error' instead of 'speedup'.
    """
    base_calib = _accuracy(calib_logits[:, 0], calib_labels)
    base_eval = _accuracy(eval_logits[:, 0], eval_labels) if eval_logits is not None else None
    param = next(model.parameters())
    entries = []
    for k in range(1, model.sets):
        calib_acc = _accuracy(calib_logits[:, k], calib_labels)
        entry = dict(branch=k, calib_accuracy=calib_acc, calib_drop=base_calib - calib_acc,
                     within=calib_acc >= base_calib - max_drop)  # choose_threshold's own test of the constraint
        if eval_logits is not None:
            entry['accuracy'] = _accuracy(eval_logits[:, k], eval_labels)
            entry['drop'] = base_eval - entry['accuracy']
        if segment_macs is not None:  # segments in exit order: branch k's backbone ends at exit M-1-k
            entry['compute'] = sum(segment_macs[:model.sets - k]) / sum(segment_macs)
        if entry['within']:
            try:
                stripped = branch_model(model, k).to(device=param.device, dtype=param.dtype)
            except ValueError as e:
                entry['error'] = ' '.join(str(e).split())
            else:
                entry['speedup'] = measure_speedup(stripped, model.base, batches, repeats)
        entries.append(entry)
    return entries


def _point_name(point: Dict) -> str:
    if 'thresholds' in point:
        return f"the point with per-exit thresholds {[round(t, 4) for t in point['thresholds']]}"
    return f"threshold {point['threshold']:.4g}" if 'threshold' in point else 'the operating point'


def _drops(item: Dict) -> str:
    calib = f"{item['calib_drop']:.2f}"
    if 'drop' not in item:
        return f'{calib} points drop on the calibration data'
    return f"{item['drop']:.2f} points drop on the evaluation data ({calib} on the calibration data)"


def _pays(point: Dict) -> bool:
    """Measured faster than the base model, with some sample leaving early (else a ratio > 1 is noise)."""
    return point['speedup'] > 1.0 and point['compute'] < 1.0


def exit_verdict(points: Sequence[Dict], branches: Sequence[Dict], max_drop: float) -> Dict:
    """Whether early exit pays, decided from measured speed-ups (never from compute fractions).

    points: early-exit operating points, each with 'speedup' (measured vs the base model; points without one are
    ignored), 'calib_drop' (accuracy points lost on the calibration data), 'compute' (MAC fraction) and optionally
    'drop' (evaluation data), 'threshold' or 'thresholds', 'chosen'. branches: `measure_branches` entries.
    A point or branch counts only if its calibration drop is within `max_drop` (1e-9 points of float slack); a
    point with compute >= 1 (no sample leaves early) never counts as paying, whatever its measured ratio.

    Returns a JSON-serialisable dict:
      'pays': some early-exit point within the drop runs faster than the base model (speed-up > 1);
      'best': that fastest point within the drop (its threshold(s), speedup, drops, compute), or None;
      'best_speedup': its speed-up (None without one); 'chosen_speedup': the point marked 'chosen' (None if untimed);
      'branch': the fastest timed stripped branch within the drop (branch, speedup, drops, compute), or None;
      'ship': what to ship within the drop: 'early-exit', 'branch' (faster than the base model and than every
      early-exit point) or 'base' (nothing within the drop is faster than the base model);
      'max_drop', and 'message': one plain sentence saying the above and what to do.
    """
    slack = 1e-9
    within = [p for p in points if 'speedup' in p and p['calib_drop'] <= max_drop + slack]
    paying = [p for p in within if p['compute'] < 1.0]
    best = max(paying or within, key=lambda p: p['speedup'], default=None)
    pays = best is not None and _pays(best)
    chosen = next((p for p in points if p.get('chosen') and 'speedup' in p), None)
    timed = [b for b in branches if 'speedup' in b and b['calib_drop'] <= max_drop + slack]
    branch = max(timed, key=lambda b: b['speedup'], default=None)
    if pays and not (branch is not None and branch['speedup'] > best['speedup']):
        ship = 'early-exit'
    elif branch is not None and branch['speedup'] > 1.0:
        ship = 'branch'
    else:
        ship = 'base'

    def keep(item, keys):
        return {k: item[k] for k in keys if k in item}

    summary = dict(pays=pays, max_drop=max_drop, ship=ship,
                   best=keep(best, ('threshold', 'thresholds', 'speedup', 'drop', 'calib_drop', 'compute', 'chosen'))
                   if best else None,
                   best_speedup=best['speedup'] if best else None,
                   chosen_speedup=chosen['speedup'] if chosen else None,
                   branch=keep(branch, ('branch', 'speedup', 'drop', 'calib_drop', 'compute')) if branch else None)

    limit = f"a drop of {max_drop:g} accuracy point{'' if max_drop == 1 else 's'} on the calibration data"
    strip_it = f"`timm-sila strip --branch {branch['branch']}` writes it" if branch else ''
    if pays:
        text = (f"Early exit pays: {_point_name(best)} runs at {best['speedup']:.2f}x the base model (measured) at "
                f"{_drops(best)}.")
        if chosen is not None and chosen is not best and not _pays(chosen):
            text += (f" The point chosen for least MACs ({_point_name(chosen)}) runs at {chosen['speedup']:.2f}x: "
                     f"use the faster one.")
        if ship == 'branch':
            text += (f" Faster still: stripped branch {branch['branch']} runs at {branch['speedup']:.2f}x at "
                     f"{_drops(branch)}; {strip_it}.")
        summary['message'] = text
        return summary
    if best is None:
        text = f'Early exit was not measured within {limit}: no verdict on its speed.'
    else:
        measured = f"the fastest runs at {best['speedup']:.2f}x" + (
            ' with no sample leaving early' if best['compute'] >= 1.0 else '')
        if chosen is not None and chosen is not best:
            measured = f"the chosen point runs at {chosen['speedup']:.2f}x, {measured}"
        text = (f'Early exit does not pay: no operating point within {limit} runs faster than the base model '
                f'(measured: {measured}). Do not ship it for speed.')
    if ship == 'branch':
        text += (f" Ship stripped branch {branch['branch']} instead: {branch['speedup']:.2f}x the base model at "
                 f"{_drops(branch)}; {strip_it}.")
    elif branch is not None:
        text += (f" The fastest stripped branch within the drop (branch {branch['branch']}) runs at "
                 f"{branch['speedup']:.2f}x: ship the base model (branch 0).")
    else:
        beyond = [f"branch {b['branch']} {b['calib_drop']:.2f}" for b in branches if 'error' not in b]
        failed = [f"branch {b['branch']} cannot be stripped: {b['error']}" for b in branches if 'error' in b]
        reasons = ([f"calibration drop: {', '.join(beyond)} points"] if beyond else []) + failed
        text += (' No stripped branch is within the drop either' + (f" ({'; '.join(reasons)})" if reasons else '')
                 + ': ship the base model (branch 0), or allow a larger drop.')
    summary['message'] = text
    return summary


def _sweep_thresholds(logits: torch.Tensor, labels: torch.Tensor, temps: List[float], seg: List[int],
                      policy: str, points: int, chosen: float) -> List[float]:
    """`points` thresholds with distinct calibration outcomes (exits per set), `chosen` among them.

    A sample leaves at some exit iff its best score over the exits clears the threshold, so thresholds at evenly
    spaced quantiles of that best score spread the fraction of early answers evenly. The quantile nearest to
    `chosen` is replaced by it; thresholds whose calibration outcome repeats one already taken are skipped and
    replaced from a finer quantile grid. Fewer than `points` only when the calibration data has fewer distinct
    operating points."""
    sets = logits.shape[1]
    table = exit_table(logits, labels, temps, policy)
    scores = torch.stack([table[0][k] for k in range(1, sets)], 1)
    best = certainty(certainty(scores, policy).amax(1), policy).double()  # each sample's most certain exit score

    @functools.lru_cache(maxsize=None)
    def at(level: float) -> float:
        return float(torch.quantile(best, level))

    def outcome(t: float) -> tuple:  # exits are nested in the threshold: equal counts per set = equal decisions
        return tuple(simulate_table(*table, [t] * (sets - 1), seg, policy)['exits'].values())

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
               progress: Progress = None) -> Dict:
    """Threshold sweep of EarlyExit(model): `points` rows (fewer only if the calibration data has fewer distinct
    operating points) of threshold, eval accuracy (%), drop and calibration drop (points below the base head on
    each split), compute fraction, exits per set and, for `timed` rows spread over the sweep plus the chosen one,
    measured throughput relative to the base model ('speedup', `measure_speedup`: same batches, alternated). The
    operating point meeting `max_drop` accuracy points on the calibration data at the least compute is one of the
    rows, marked 'chosen'. 'per_exit' is the operating point with one threshold per exit (`choose_thresholds`,
    same constraint, calibration data), measured the same way. Temperatures are fitted on the calibration data
    within `TEMPERATURE_BOUNDS`; any that had to be clamped is warned about and listed in 'warnings'.

    Compute is a MAC count, not time. 'branches' (`measure_branches`) times each stripped branch whose calibration
    drop is within `max_drop` against the base model on the same batches, and 'verdict' (`exit_verdict` over the
    timed rows, per_exit and the branches) says whether any early-exit point within `max_drop` is measured faster
    than the base model and, if not, which stripped branch is the fastest within the drop ('ship'). When the chosen
    point is measured no faster than the base model a `SlowerThanBaseWarning` carries the verdict's message (also
    listed in 'warnings'): an EarlyExit saved at that point would be slower than the model it replaces.
    progress: called with one line per phase and batch report (e.g. a function writing it to stderr)."""
    points = require_int(points, 'points', 1)
    timed = require_int(timed, 'timed', 0)
    repeats = require_int(repeats, 'repeats', 1)
    if finite_float(max_drop) is None or max_drop < 0:
        raise ValueError(f'max_drop must be a finite number of accuracy points >= 0, got {short(max_drop)}.')
    if progress is not None and not callable(progress):
        raise ValueError(f'progress must be a function taking one line of text (e.g. one that writes it to stderr), '
                         f'or None; got {progress!r}.')
    report = progress or (lambda line: None)
    calib_logits, calib_labels, _ = collect_branch_logits(model, calib_loader, device, progress, what='calibration')
    eval_logits, eval_labels, batches = collect_branch_logits(model, eval_loader, device, progress, what='evaluation')
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
    base_acc = _accuracy(eval_logits[:, 0], eval_labels)
    calib_base_acc = chosen['base_accuracy']
    eval_table = exit_table(eval_logits, eval_labels, temps, policy)
    calib_table = exit_table(calib_logits, calib_labels, temps, policy)
    rows = []
    for t in thresholds:
        row = simulate_table(*eval_table, [t] * (model.sets - 1), seg, policy)
        calib = simulate_table(*calib_table, [t] * (model.sets - 1), seg, policy)
        rows.append(dict(row, threshold=t, drop=base_acc - row['accuracy'],
                         calib_drop=calib_base_acc - calib['accuracy'], chosen=t == chosen['threshold']))
    per = choose_thresholds(calib_logits, calib_labels, temps, seg, policy=policy, max_drop=max_drop)
    per_exit = dict(simulate_table(*eval_table, per['thresholds'], seg, policy),
                    thresholds=per['thresholds'], calib_compute=per['compute'],
                    calib_drop=per['base_accuracy'] - per['accuracy'])
    per_exit['drop'] = base_acc - per_exit['accuracy']
    chosen_at = next(i for i, r in enumerate(rows) if r['chosen'])
    spread = torch.linspace(0, len(rows) - 1, timed).round().long().tolist() if timed > 0 else []
    to_time = [rows[i] for i in sorted({chosen_at, *spread})] + [per_exit]
    report(f'timing {len(to_time)} operating points against the base model')
    for row in to_time:
        ee.set_thresholds(row.get('thresholds', row.get('threshold')))
        row['speedup'] = measure_speedup(ee, model.base, batches, repeats)
        row['measured_compute'] = ee(torch.cat(batches)).compute
    report(f'timing the stripped branches within {max_drop:g} points against the base model')
    branches = measure_branches(model, calib_logits, calib_labels, batches, max_drop, eval_logits, eval_labels,
                                seg, repeats)
    verdict = exit_verdict(rows + [per_exit], branches, max_drop)
    if not _pays(rows[chosen_at]):  # an EarlyExit saved at the chosen point would not be faster
        notes.append(verdict['message'])
        warnings.warn(verdict['message'], SlowerThanBaseWarning, stacklevel=3)
    return dict(policy=policy, temperatures=temps, segment_macs=seg, base_accuracy=base_acc,
                calib_samples=len(calib_labels), eval_samples=len(eval_labels), max_drop=max_drop, rows=rows,
                batch_size=len(batches[0]), per_exit=per_exit, branches=branches, verdict=verdict, warnings=notes)


def plot_curve(result: Dict, path: Path) -> Optional[Path]:
    """The sweep of an `exit_curve` result as a PNG at `path` (accuracy vs compute, and vs 1 / measured speed-up);
    None, writing nothing, where matplotlib is not installed."""
    try:  # optional dependency (the examples extra), imported only to draw
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
