"""The one reader of `timm-sila eval --json` results, range-checked before a number reaches a card or a table.

`read_eval_metrics(source)` takes the result as a file or a dict and returns it checked:

    num_samples   an integer >= 1 (bool refused)
    branches      a non-empty list of rows, one per branch (an integer >= 0, no branch twice)
    topK (%)      finite, in [0, 100]; top1 required; top1 <= top2 <= ... over the ks present
    loss          finite, >= 0
    params        an integer >= 0 (not a float, not a bool); `check_params` compares it with the model's count
    ensemble      None, or a row of the same accuracies and loss
    split         a string (shown only where the consumer accepts it)

A file is read with `timm_sila.io.trust.read_file_json` (a regular file, opened without blocking, JSON within the
size and nesting bounds of `FILE_LIMITS`). Every failure is a `MetricsError` (a ValueError) naming the file and the
value.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Union

from timm_sila import _checks as checks
from timm_sila.io.trust import read_file_json

__all__ = ['MetricsError', 'read_eval_metrics', 'check_params', 'ACCURACY_KEYS']

ACCURACY_KEYS = ('top1', 'top2', 'top3', 'top4', 'top5')


class MetricsError(ValueError):
    """A metrics file or value that is not a `timm-sila eval --json` result, or holds a value out of range."""


def _number(value: Any) -> Optional[float]:
    """float(value) for a finite real number (`_checks.is_real`: never a bool, nor an integer beyond float range)."""
    return float(value) if checks.is_real(value) else None


def _row(row: Any, source: str, where: str, with_params: bool) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise MetricsError(f'{source}: {where} is {checks.short(row)}, not a row of metrics.')
    out: Dict[str, Any] = {}
    for key in ACCURACY_KEYS:
        if row.get(key) is None:
            continue
        value = _number(row[key])
        if value is None or not 0.0 <= value <= 100.0:
            raise MetricsError(f'{source}: {where} has {key} = {checks.short(row[key])}; an accuracy is a finite '
                               f'percentage in [0, 100]. Pass the output of `timm-sila eval --json`.')
        out[key] = value
    if 'top1' not in out:
        raise MetricsError(f'{source}: {where} has no top1 accuracy.')
    ks = [k for k in ACCURACY_KEYS if k in out]
    for lower, upper in zip(ks, ks[1:]):
        if out[upper] < out[lower]:
            raise MetricsError(f'{source}: {where} has {upper} = {out[upper]:g} below {lower} = {out[lower]:g}; '
                               f'top-k accuracy cannot fall as k grows.')
    if row.get('loss') is not None:
        loss = _number(row['loss'])
        if loss is None or loss < 0:
            raise MetricsError(f'{source}: {where} has loss = {checks.short(row["loss"])}; a cross-entropy is a finite '
                               f'number >= 0.')
        out['loss'] = loss
    if with_params and row.get('params') is not None:
        params = row['params']
        if not checks.is_int(params) or params < 0:
            raise MetricsError(f'{source}: {where} has params = {checks.short(params)}; a parameter count is an '
                               f'integer >= 0.')
        out['params'] = int(params)
    return out


def read_eval_metrics(metrics: Union[str, Path, Dict[str, Any]]) -> Dict[str, Any]:
    """The checked `timm-sila eval --json` result of a file or dict (rules in the module docstring):
    dict(source, num_samples, split (str or None), branches={branch: {top1.., loss?, params?}}, ensemble (or None)).
    Raises MetricsError (ValueError) naming the source and the value; OSError for a file the system refuses."""
    if isinstance(metrics, dict):
        source = 'metrics'
    else:
        source = str(metrics)
        metrics = read_file_json(metrics, 'the metrics file', error=MetricsError,
                                 hint='Pass the output of `timm-sila eval --json`.')
    if not isinstance(metrics, dict):
        raise MetricsError(f'{source} is not a `timm-sila eval --json` result (a JSON object).')
    rows = metrics.get('branches')
    if not isinstance(rows, list) or not rows:
        raise MetricsError(f'{source} has no "branches" list; pass the output of `timm-sila eval --json`.')
    n = metrics.get('num_samples')
    if not checks.is_int(n) or n < 1:
        raise MetricsError(f'{source} has num_samples = {checks.short(n)}; the images evaluated are an integer >= 1. '
                           f'Pass the output of `timm-sila eval --json`.')
    branches: Dict[int, Dict[str, Any]] = {}
    for i, row in enumerate(rows):
        branch = row.get('branch') if isinstance(row, dict) else None
        if not checks.is_int(branch) or branch < 0:
            raise MetricsError(f'{source}: branches[{i}] needs an integer "branch" >= 0, got {checks.short(branch)}.')
        if branch in branches:
            raise MetricsError(f'{source} holds branch {branch} twice; pass the output of one `timm-sila eval` run.')
        branches[int(branch)] = _row(row, source, f'branch {branch}', with_params=True)
    ensemble = metrics.get('ensemble')
    if ensemble is not None:
        ensemble = _row(ensemble, source, 'the ensemble', with_params=False)
    split = metrics.get('split')
    return dict(source=source, num_samples=int(n), split=split if isinstance(split, str) else None,
                branches=branches, ensemble=ensemble)


def check_params(metrics: Dict[str, Any], branch: int, params: int, what: str = 'the model') -> None:
    """MetricsError unless the parameter count the (checked) metrics give `branch`, if any, is `params`."""
    given = metrics['branches'].get(branch, {}).get('params')
    if given is not None and given != params:
        raise MetricsError(f'{metrics["source"]} gives branch {branch} {given:,} params, {what} has {params:,}: the '
                           f'eval JSON is of another model.')
