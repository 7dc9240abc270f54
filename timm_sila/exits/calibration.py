"""Early-exit operating points chosen offline from cached branch logits (n, M, N) of held-out data: per-set
temperatures, simulated exit decisions, and shared or per-exit thresholds (see `policy` for the exit test).

segment_macs: per-sample MACs of each backbone segment in exit order (input -> shallowest tap, ..., deepest tap ->
output), as `EarlyExit.segment_macs` measures them.

Every 'compute' here is that MAC fraction, an estimate of work, not of time: routing costs time per batch and early
layers are often memory-bound, so an operating point with compute < 1 can run slower than the base model. Before
shipping an EarlyExit for speed, measure it (`timm_sila.exits.curve.measure_speedup(early_exit, None, batches)`), or
run `exit_curve`, whose 'verdict' says whether any point within the drop is faster and which stripped branch is.
"""
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from timm_sila._checks import finite_float, short
from .policy import NEVER, certainty, exit_score, exits

__all__ = ['TEMPERATURE_BOUNDS', 'calibrate_temperatures', 'exit_table', 'simulate_table', 'simulate_exits',
           'choose_threshold', 'choose_thresholds']


TEMPERATURE_BOUNDS = (0.05, 20.0)


def calibrate_temperatures(branch_logits: torch.Tensor, labels: torch.Tensor, steps: int = 100,
                           bounds: Sequence[float] = TEMPERATURE_BOUNDS) -> List[float]:
    """Per-set temperature minimising NLL on held-out data, within `bounds`. branch_logits: (n, M, N) in set order.

    The NLL is convex in 1/T, so clamping the free fit to `bounds` gives the best temperature within them. A fit
    outside them is clamped with a UserWarning: T > 20 means the set's logits carry almost no confidence
    information (typically an untrained or collapsed head, whose free fit runs off to thousands), T < 0.05 that
    they are compressed 20-fold; either way thresholds on such scores would mean little.
    """
    if branch_logits.ndim != 3 or branch_logits.shape[0] == 0 or labels.shape != branch_logits.shape[:1]:
        raise ValueError(f'Temperature calibration needs (n, M, N) logits with n >= 1 and (n,) labels, got '
                         f'{tuple(branch_logits.shape)} and {tuple(labels.shape)}: is the calibration set empty?')
    low, high = bounds
    temps = []
    for k in range(branch_logits.shape[1]):
        logits = branch_logits[:, k].double()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        opt.step(closure)
        fitted = float(log_t.detach().exp())
        if math.isnan(fitted):
            raise ValueError(f'Temperature calibration of set {k} failed: its logits are not finite.')
        t = min(max(fitted, low), high)
        if t != fitted:
            warnings.warn(f'set {k}: fitted temperature {fitted:.4g} is outside [{low}, {high}] (its logits carry '
                          f'{"almost no" if fitted > high else "compressed"} confidence information, e.g. an '
                          f'untrained head); using {t}.', UserWarning, stacklevel=2)
        temps.append(t)
    return temps


def exit_table(branch_logits: torch.Tensor, labels: torch.Tensor, temperatures: Sequence[float], policy: str
                ) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
    """What every exit decision needs, computed once per set: ({k: (n,) exit scores of set k >= 1 after its
    temperature}, {k: (n,) whether set k's prediction is right, set 0 included}). Trying a threshold is then only
    comparisons."""
    scores, correct = {}, {0: branch_logits[:, 0].argmax(-1) == labels}
    for k in range(1, branch_logits.shape[1]):
        logits = branch_logits[:, k] / temperatures[k]
        scores[k] = exit_score(logits, policy)
        correct[k] = logits.argmax(-1) == labels
    return scores, correct


def simulate_table(scores: Dict[int, torch.Tensor], correct: Dict[int, torch.Tensor], thresholds: Sequence[float],
              segment_macs: Sequence[int], policy: str) -> dict:
    """simulate_exits() from an `exit_table` (so each threshold tried costs only comparisons)."""
    exit_sets = sorted(scores, reverse=True)
    n = correct[0].shape[0]
    answered = torch.zeros(n, dtype=torch.bool)
    right = torch.zeros(n, dtype=torch.bool)
    exit_set = torch.zeros(n, dtype=torch.long)
    macs = 0.0
    for j, k in enumerate(exit_sets):
        macs += segment_macs[j] * float((~answered).sum())
        leave = exits(scores[k], thresholds[j], policy) & ~answered
        right |= leave & correct[k]
        exit_set[leave] = k
        answered |= leave
    macs += segment_macs[-1] * float((~answered).sum())
    right |= ~answered & correct[0]
    return dict(accuracy=100.0 * float(right.float().mean()), compute=macs / (sum(segment_macs) * n),
                exits={k: int((exit_set == k).sum()) for k in [*exit_sets, 0]})


def simulate_exits(branch_logits: torch.Tensor, labels: torch.Tensor, thresholds: Sequence[float],
                   temperatures: Sequence[float], segment_macs: Sequence[int], policy: str = 'confidence') -> dict:
    """Offline exit decisions from cached branch logits (n, M, N).

    segment_macs: per-sample backbone MACs of each segment in exit order (input → shallowest tap, …,
    deepest tap → output). Returns accuracy (%), compute fraction and the exit-set histogram.
    """
    return simulate_table(*exit_table(branch_logits, labels, temperatures, policy), thresholds, segment_macs, policy)


def choose_threshold(branch_logits, labels, temperatures, segment_macs, policy='confidence',
                     max_drop: Optional[float] = None, budget: Optional[float] = None,
                     candidates: int = 200) -> dict:
    """One threshold shared by all exits (after temperature scaling), chosen on held-out data:
    the least compute whose accuracy is within `max_drop` points of the base head's, or the best accuracy
    within a compute `budget` (fraction). Returns the chosen simulate_exits() row plus 'threshold'."""
    if (max_drop is None) == (budget is None):
        raise ValueError('Give exactly one of max_drop (accuracy points) or budget (compute fraction).')
    limit = max_drop if budget is None else budget
    if finite_float(limit) is None or limit < 0:
        raise ValueError(f'max_drop / budget must be a finite number >= 0, got {short(limit)}.')
    scores, correct = exit_table(branch_logits, labels, temperatures, policy)
    base_acc = 100.0 * float(correct[0].float().mean())
    all_scores = torch.cat([scores[k] for k in range(1, branch_logits.shape[1])])
    grid = torch.quantile(all_scores.float(), torch.linspace(0, 1, candidates)).tolist()
    grid = sorted(set(grid) | {NEVER[policy]}, key=lambda t: certainty(t, policy))
    rows = []
    for t in grid:
        row = simulate_table(scores, correct, [t] * (branch_logits.shape[1] - 1), segment_macs, policy)
        rows.append(dict(row, threshold=t))
    if max_drop is not None:
        ok = [r for r in rows if r['accuracy'] >= base_acc - max_drop]
        best = min(ok, key=lambda r: (r['compute'], -r['accuracy']))
    else:
        ok = [r for r in rows if r['compute'] <= budget]
        if not ok:
            raise ValueError(f'No threshold reaches a compute budget of {budget}: the shallowest exit alone costs '
                             f'more.')
        best = max(ok, key=lambda r: (r['accuracy'], -r['compute']))
    return dict(best, base_accuracy=base_acc)


def choose_thresholds(branch_logits, labels, temperatures, segment_macs, policy='confidence', max_drop: float = 1.0,
                      candidates: int = 50, rounds: int = 4) -> dict:
    """One threshold per exit (exit order, as EarlyExit takes them), chosen on held-out data: the least compute
    whose accuracy is within `max_drop` points of the base head's.

    Starts from the shared threshold of `choose_threshold` and improves one exit at a time (coordinate descent over
    `candidates` quantiles of that exit's scores, plus "never exit"), for up to `rounds` passes; a change is kept
    only if it lowers compute within the accuracy constraint, so the result never costs more than the shared one.
    Returns the chosen simulate_exits() row plus 'thresholds' and 'base_accuracy'."""
    shared = choose_threshold(branch_logits, labels, temperatures, segment_macs, policy, max_drop=max_drop)
    base_acc, floor = shared['base_accuracy'], shared['base_accuracy'] - max_drop
    exit_sets = list(range(branch_logits.shape[1] - 1, 0, -1))
    scores, correct = exit_table(branch_logits, labels, temperatures, policy)
    grids = []
    for k in exit_sets:
        levels = torch.linspace(0, 1, candidates, dtype=torch.float64)
        grids.append(sorted(set(torch.quantile(scores[k].double(), levels).tolist()) | {NEVER[policy]},
                            key=lambda t: certainty(t, policy)))
    best = dict(simulate_table(scores, correct, [shared['threshold']] * len(exit_sets), segment_macs, policy),
                thresholds=[shared['threshold']] * len(exit_sets))
    for _ in range(rounds):
        improved = False
        for j, grid in enumerate(grids):
            for t in grid:
                trial = list(best['thresholds'])
                trial[j] = t
                row = simulate_table(scores, correct, trial, segment_macs, policy)
                if row['accuracy'] >= floor and (row['compute'], -row['accuracy']) < (best['compute'],
                                                                                      -best['accuracy']):
                    best, improved = dict(row, thresholds=trial), True
        if not improved:
            break
    return dict(best, base_accuracy=base_acc)
