"""Speed of every branch, side by side (paper Table 3 with throughput): the table a user picks a branch from.

`bench_branches(source, ...)` times the base model and each branch in one process on one input batch: after
`warmup` untimed rounds, each of `repeats` rounds runs every model once, starting each round at the next model
(so no model always runs first or right after the same neighbour), and reports per model the median batch latency
and images/s = batch_size / median. Speed does not depend on the weights, so a model name (random weights) answers
"which branch is fast enough here" before training. Params / MB (fp32, 2^20 bytes) / CR are counted from the
models timed; accuracy comes from a `timm-sila eval --json` file when one is given.
"""
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

import timm

from timm_sila.io.checkpoint import create_with_img_size
from timm_sila.ship.export import _data_config, export, load_branch, load_checkpoint, require_onnx
from .metrics import check_params, read_eval_metrics
from timm_sila.config import sila_name
from timm_sila.model import SilaNet
from timm_sila.ship.strip import export_model
from .sizes import MemoryBoundError, check_batch_fits, count_params, size_row
from timm_sila._timm_compat import model_args

__all__ = ['bench_branches', 'format_bench', 'read_metrics', 'RUNTIMES']

RUNTIMES = ('torch', 'onnxruntime')


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
    return value


def _sila_kwargs(num_classes=None, sets=None, taps=None, head=None, **model_kwargs) -> Dict[str, Any]:
    sila = dict(num_classes=num_classes, sila_sets=sets, sila_taps=list(taps) if taps else None, sila_head=head)
    return dict(model_kwargs, **{k: v for k, v in sila.items() if v is not None})


def _base_of(net: SilaNet) -> nn.Module:
    """A randomly initialised base architecture of a stripped SilaNet (for timing and parameter counts)."""
    args = dict(model_args(net.base), num_classes=net.num_classes)
    return timm.create_model(net.arch, **args).eval()


def _models(source: Union[str, Path, nn.Module], img_size: Optional[int], load_kwargs: Dict[str, Any]
            ) -> Tuple[List[Dict[str, Any]], Dict[str, Any], str]:
    """([{branch, exit, model, weights}], data config args, description of the source)."""
    if isinstance(source, str) and not Path(source).exists() and timm.is_model(sila_name(source)):
        name = sila_name(source)
        if load_kwargs.get('model') or load_kwargs.get('ema'):
            raise ValueError(f'model= / ema= apply to checkpoint files; {source} is a model name (random weights).')
        load_kwargs = {k: v for k, v in load_kwargs.items() if k not in ('model', 'ema')}
        net = create_with_img_size(name, img_size, **_sila_kwargs(**load_kwargs)).eval()
        return _all_branches(net, 'random'), {}, f'{name} (random weights)'
    if isinstance(source, SilaNet) and not source.stripped:
        if load_kwargs:
            raise ValueError(f'{sorted(load_kwargs)} only apply when source is a file, folder or model name.')
        return _all_branches(source.eval(), 'given'), {}, f'{source.arch} SilaNet'
    if isinstance(source, (str, Path)) and Path(source).is_file():
        net, data_args = load_checkpoint(source, img_size, **load_kwargs)
        return _all_branches(net, 'checkpoint'), data_args, str(source)
    model, branch, data_args = load_branch(source, None, img_size, **load_kwargs)
    rows = []
    if branch:
        rows.append(dict(branch=0, exit='classifier', model=_base_of(model), weights='random'))
        exit_at = model.taps[branch - 1]
    else:
        exit_at = 'classifier'
    rows.append(dict(branch=branch, exit=exit_at, model=model, weights='given'))
    return rows, data_args, str(source) if isinstance(source, (str, Path)) else type(source).__name__


def _all_branches(net: SilaNet, weights: str) -> List[Dict[str, Any]]:
    rows = [dict(branch=0, exit='classifier', model=export_model(net, 0), weights=weights)]
    for k in range(1, net.sets):
        rows.append(dict(branch=k, exit=net.taps[k - 1], model=export_model(net, k), weights=weights))
    return rows


def read_metrics(metrics: Union[str, Path, Dict[str, Any]]) -> Dict[int, Dict[str, float]]:
    """{branch: {'top1': .., 'top5': .., 'params': ..}} from a `timm-sila eval --json` result (file or dict),
    range-checked by `timm_sila.metrics.read_eval_metrics` (MetricsError, a ValueError, naming the value)."""
    rows = read_eval_metrics(metrics)['branches']
    return {b: {k: v for k, v in row.items() if k in ('top1', 'top5', 'params')} for b, row in rows.items()}


def _torch_runner(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], Any]:
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def run(x):
        with torch.inference_mode():
            model(x)
        sync()
    return run


def _ort_runner(model: nn.Module, branch: int, folder: Path, input_size: List[int], threads: int
                ) -> Callable[[torch.Tensor], Any]:
    """Export `model` to ONNX (verified with onnxruntime) and return a timed onnxruntime session."""
    _, ort = require_onnx()
    path = folder / f'branch{branch}.onnx'
    export(model, branch, 'onnx', path, img_size=input_size[-1])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def bench_branches(
        source: Union[str, Path, nn.Module],
        img_size: Optional[int] = None,
        batch_size: int = 16,
        threads: Optional[int] = None,
        runtime: str = 'torch',
        warmup: int = 3,
        repeats: int = 20,
        metrics: Union[str, Path, Dict[str, Any], None] = None,
        device: str = 'cpu',
        **load_kwargs,
) -> Dict[str, Any]:
    """Images/s and latency of the base and every branch of `source`, measured side by side in one run.

    `source`: a SilaNet checkpoint file or SilaNet (all branches), a strip output folder (its branch, plus the
    base architecture with random weights when the branch is k >= 1), or a model name such as `sila_resnet18`
    (random weights; `load_kwargs` num_classes=, sets=, taps=, head=, model kwargs). `runtime='onnxruntime'`
    exports each model to ONNX first (parity-checked) and times onnxruntime CPU sessions. `threads`: intra-op
    threads (default: torch's current setting). `metrics`: a `timm-sila eval --json` result adding top-1/top-5.
    A batch that cannot fit in memory (`timm_sila.sizes.check_batch_fits`) is a MemoryBoundError (ValueError).
    Returns dict(source, runtime, device, threads, batch_size, input_size, warmup, repeats, rows=[{branch, exit,
    weights, params, size_mb, cr, latency_ms, latency_ms_iqr, images_per_s, speedup, top1?, top5?}]).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}.')
    batch_size = _positive_int(batch_size, 'batch_size')
    warmup = _positive_int(warmup, 'warmup', 0)
    repeats = _positive_int(repeats, 'repeats')
    threads = torch.get_num_threads() if threads is None else _positive_int(threads, 'threads')
    device = torch.device(device)
    if runtime == 'onnxruntime':
        require_onnx()
        if device.type != 'cpu':
            raise ValueError('runtime onnxruntime is timed on the CPU; pass device="cpu" (CLI: omit --device).')
    checked = read_eval_metrics(metrics) if metrics is not None else None
    accuracy = checked['branches'] if checked is not None else {}
    rows, data_args, described = _models(source, img_size, load_kwargs)
    cfg = _data_config(rows[-1]['model'], data_args, img_size)
    input_size = list(cfg['input_size'])
    check_batch_fits(batch_size, input_size, rows[0]['model'])  # the base: the largest activations
    if runtime == 'torch' and device.type != 'cpu':
        check_batch_fits(batch_size, input_size, rows[0]['model'], device=device)
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))

    base_params = count_params(rows[0]['model'])
    results = []
    for row in rows:
        params = count_params(row['model'])
        entry = dict(size_row(row['branch'], row['exit'], params, base_params), weights=row['weights'])
        if row['branch'] in accuracy and row['weights'] != 'random':
            check_params(checked, row['branch'], params, 'the model benchmarked')
            entry.update({k: v for k, v in accuracy[row['branch']].items() if k in ('top1', 'top5')})
        results.append(entry)
    if accuracy and not any('top1' in r for r in results):
        raise ValueError(f'The metrics hold branches {sorted(accuracy)}, none of which is benchmarked here.')

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix='timm-sila-bench-') as tmp:
            if runtime == 'onnxruntime':
                runners = [_ort_runner(r['model'], r['branch'], Path(tmp), input_size, threads) for r in rows]
            else:
                x = x.to(device)
                runners = [_torch_runner(r['model'], device) for r in rows]
            times = _time_side_by_side(runners, x, warmup, repeats)
    finally:
        torch.set_num_threads(previous_threads)

    for entry, seconds in zip(results, times):
        median = statistics.median(seconds)
        q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [median, median, median]
        entry.update(latency_ms=1000 * median, latency_ms_iqr=1000 * (q[2] - q[0]), images_per_s=batch_size / median)
        entry['speedup'] = entry['images_per_s'] / results[0]['images_per_s']
    return dict(source=described, runtime=runtime, device=str(device), threads=threads, batch_size=batch_size,
                input_size=input_size, warmup=warmup, repeats=repeats, rows=results,
                versions=dict(torch=torch.__version__, timm=timm.__version__))


def _time_side_by_side(runners: List[Callable], x: torch.Tensor, warmup: int, repeats: int) -> List[List[float]]:
    """Per runner, `repeats` wall times of one call on x; round i starts at runner i mod n."""
    n = len(runners)
    for _ in range(warmup):
        for run in runners:
            run(x)
    times: List[List[float]] = [[] for _ in runners]
    for i in range(repeats):
        for j in (list(range(n))[i % n:] + list(range(n))[:i % n]):
            start = time.perf_counter()
            runners[j](x)
            times[j].append(time.perf_counter() - start)
    return times


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
                     + acc + [f"{r['latency_ms']:.2f} ± {r['latency_ms_iqr'] / 2:.2f}", f"{r['images_per_s']:,.0f}" if r['images_per_s'] >= 100 else f"{r['images_per_s']:.3g}",
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


# --- CLI: timm-sila bench (parser: timm_sila_cli) ---------------------------------------------------------------
def run_bench(args: Any) -> int:
    """`timm-sila bench`: prints the per-branch speed table (or JSON)."""
    from timm_sila.cli import print_json
    from timm_sila.ship.export import cli_load_kwargs
    try:
        result = bench_branches(args.source, img_size=args.img_size, batch_size=args.batch_size, threads=args.threads,
                                runtime=args.runtime, warmup=args.warmup, repeats=args.repeats, metrics=args.metrics,
                                device=args.device, **cli_load_kwargs(args))
    except MemoryBoundError as e:  # the API's message names batch_size / img_size; the CLI's flags differ
        raise ValueError(e.message('--batch-size', '--img-size')) from e
    if args.json:
        print_json(result)
    else:
        print(format_bench(result))
    return 0
