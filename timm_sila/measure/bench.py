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

from timm_sila._checks import require_int
from timm_sila.config import sila_kwargs, sila_name
from timm_sila.data.config import resolve_data_config
from timm_sila.data.memory import check_batch_fits
from timm_sila.model import SilaNet, create_with_img_size
from timm_sila.ship.export import export, require_onnx
from timm_sila.ship.load import load_branch, load_silanet_and_data_args
from timm_sila.ship.strip import branch_model
from .metrics import check_params, read_eval_metrics
from .sizes import count_params, size_row

__all__ = ['bench_branches', 'RUNTIMES']

RUNTIMES = ('torch', 'onnxruntime')


def _base_of(net: SilaNet) -> nn.Module:
    """A randomly initialised base architecture of a stripped SilaNet (for timing and parameter counts)."""
    return timm.create_model(net.arch, **net.base_args()).eval()


def _models(source: Union[str, Path, nn.Module], img_size: Optional[int], load_kwargs: Dict[str, Any]
            ) -> Tuple[List[Dict[str, Any]], Dict[str, Any], str]:
    """([{branch, exit, model, weights}], data config args, description of the source)."""
    if isinstance(source, str) and not Path(source).exists() and timm.is_model(sila_name(source)):
        name = sila_name(source)
        if load_kwargs.get('model') or load_kwargs.get('ema'):
            raise ValueError(f'model= / ema= apply to checkpoint files; {source} is a model name (random weights).')
        kwargs = {k: v for k, v in load_kwargs.items() if k not in ('model', 'ema', 'sets', 'taps', 'head')}
        settings = sila_kwargs(sets=load_kwargs.get('sets'), taps=load_kwargs.get('taps') or None,
                               head=load_kwargs.get('head'))
        net = create_with_img_size(name, img_size, **kwargs, **settings).eval()
        return _all_branches(net, 'random'), {}, f'{name} (random weights)'
    if isinstance(source, SilaNet) and not source.stripped:
        if load_kwargs:
            raise ValueError(f'{sorted(load_kwargs)} only apply when source is a file, folder or model name.')
        return _all_branches(source.eval(), 'given'), {}, f'{source.arch} SilaNet'
    if isinstance(source, (str, Path)) and Path(source).is_file():
        net, data_args = load_silanet_and_data_args(source, img_size, **load_kwargs)
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
    rows = [dict(branch=0, exit='classifier', model=branch_model(net, 0), weights=weights)]
    for k in range(1, net.sets):
        rows.append(dict(branch=k, exit=net.taps[k - 1], model=branch_model(net, k), weights=weights))
    return rows


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
    export(model, branch, 'onnx', path, img_size=tuple(input_size[-2:]))  # (H, W): the size the torch rows run at
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
    A batch that cannot fit in memory (`timm_sila.data.memory.check_batch_fits`) is a MemoryBoundError (ValueError).
    Returns dict(source, runtime, device, threads, batch_size, input_size, warmup, repeats, rows=[{branch, exit,
    weights, params, size_mb, cr, latency_ms, latency_ms_iqr, images_per_s, speedup, top1?, top5?}]).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {RUNTIMES}, got {runtime!r}.')
    batch_size = require_int(batch_size, 'batch_size', 1)
    warmup = require_int(warmup, 'warmup', 0)
    repeats = require_int(repeats, 'repeats', 1)
    threads = torch.get_num_threads() if threads is None else require_int(threads, 'threads', 1)
    device = torch.device(device)
    if runtime == 'onnxruntime':
        require_onnx()
        if device.type != 'cpu':
            raise ValueError('runtime onnxruntime is timed on the CPU; pass device="cpu" (CLI: omit --device).')
    checked = read_eval_metrics(metrics) if metrics is not None else None
    accuracy = checked['branches'] if checked is not None else {}
    rows, data_args, described = _models(source, img_size, load_kwargs)
    cfg = resolve_data_config(rows[-1]['model'], data_args, img_size)
    input_size = list(cfg['input_size'])
    on_cpu = runtime == 'onnxruntime' or device.type == 'cpu'
    # the base has the largest activations; on another device only the input batch is in RAM
    check_batch_fits(batch_size, input_size, rows[0]['model'] if on_cpu else None)
    if not on_cpu:
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
