"""Coverage sweep: one architecture per timm family (its smallest variant) plus the paper's six, as SilaNets.

    python benchmarks/coverage.py --jobs 2            # full sweep, resumable -> docs/coverage.md
    python benchmarks/coverage.py --families resnet,vit --force
    python benchmarks/coverage.py --archs resnet18,levit_128s --no-doc
    python benchmarks/coverage.py --report-only       # rewrite docs/coverage.md from the results file
    python benchmarks/coverage.py --jobs 2 --export   # also the ONNX export checks (about doubles the time)
    python benchmarks/coverage.py --jobs 2 --export-only  # add the ONNX checks to the results already there

Families come from `timm.list_models()`: family = (name prefix, timm module). The prefix is the name up to the
first '_' with a trailing variant number dropped ('resnet50d' -> 'resnet', 'vgg19_bn' -> 'vgg', 'res2net50_14w_8s'
-> 'res2net', 'dla102x2' -> 'dla', 'eva02_base...' -> 'eva') but a version 'vN' kept ('mobilenetv3_large_100' -> 'mobilenetv3',
'convnextv2_atto' -> 'convnextv2'). Splitting by the module that implements the model keeps different code paths
apart when they share a prefix ('resnet50_clip' in byobnet vs 'resnet18' in resnet, 'tf_efficientnet_b0' vs
'tf_mobilenetv3_large_100'); such families are shown as 'prefix (module)'. The smallest variant of a family is the
one with the fewest parameters, counted on the 'meta' device (no memory, no init) and cached per timm version.

Each architecture runs `check_arch` in its own subprocess with a time limit (one crash or hang cannot end the
sweep). It builds `sila_<arch>` (num_classes=10) at the smallest input the model accepts, then checks:
  train   train-mode forward is SilaLogits (B, M*N); backward reaches every auxiliary head and the classifier
  eval0   eval branch 0 is bitwise equal (torch.equal) to vanilla timm carrying the same weights
  strip0  strip(branch=0) -> timm.create_model('local-dir:...', pretrained=True) in a fresh process that never
          imports timm_sila gives bitwise equal logits
  strip1  strip(branch=1) -> reloaded after `import timm_sila` gives bitwise equal branch-1 logits, and has fewer
          parameters than the base model
  onnx0, onnx1  (with --export; deployment, reported in their own column) `timm_sila.export(net, k, 'onnx')`: torch.onnx
          export of branch k (the dynamo exporter, or the TorchScript one when dynamo fails), reloaded in
          onnxruntime and compared with PyTorch at batch 2 and 1 within the export tolerance
          (1e-4 * max(1, max |logit|)); the record keeps which exporter wrote the file and why dynamo did not
A check that raises the plugin's own clear ValueError (e.g. timm gives the model no prune_intermediate_layers or
feature_info) is recorded as 'refused' with that message; anything else that raises or mismatches is 'fail'.
Results are appended to a JSON-lines file (one line per architecture); archs already there are skipped unless
--force. The report lists families passed / total and one row per architecture tried.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / 'runs' / 'coverage' / 'results.jsonl'
DEFAULT_DOC = REPO / 'docs' / 'coverage.md'
PAPER_SIX = ('resnet18', 'vgg19_bn', 'mobilenetv1_100', 'wide_resnet50_2', 'densenet121', 'inception_v3')
CHECKS = ('build', 'train', 'eval0', 'strip0', 'strip1')
EXPORT_CHECKS = ('onnx0', 'onnx1')  # recorded per family beside the result; not part of pass / fail
# per branch: max |delta|, the exporter that wrote the file ('dynamo' or 'torchscript'; a record without it predates
# the fallback and was written by dynamo), and why dynamo did not when the fallback did
ONNX_RECORD_KEYS = ('onnx_max_abs_diff', 'onnx_exporter', 'onnx_exporter_reason')
NUM_CLASSES = 10
BATCH = 2
SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
_MARK = '@@COVERAGE@@'
_PLUGIN_DIR = None  # timm_sila package folder, set lazily (errors raised from it are the plugin's own)


# --- families ------------------------------------------------------------------------------------------------
def name_prefix(name: str) -> str:
    """'resnet50d' -> 'resnet', 'vit_tiny_patch16_224' -> 'vit', 'mobilenetv3_large_100' -> 'mobilenetv3'."""
    token = name.split('_', 1)[0]
    while True:  # drop trailing variant numbers: 'dla102x2' -> 'dla102x' -> 'dla'; keep versions 'v2'
        m = re.fullmatch(r'(.*?[a-z])(\d+[a-z]{0,2})', token)
        if not m or m.group(1).endswith('v'):
            return token
        token = m.group(1)


def family_map(names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Family label -> its architectures, from timm.list_models() (sila_* names excluded)."""
    import timm
    module_of = {n: m for m in timm.list_modules() for n in timm.list_models(module=m)}
    names = [n for n in (names or timm.list_models()) if not n.startswith('sila_')]
    keyed = defaultdict(list)
    for n in names:
        keyed[(name_prefix(n), module_of.get(n, '?'))].append(n)
    per_prefix = Counter(p for p, _ in keyed)
    return {(p if per_prefix[p] == 1 else f'{p} ({mod})'): sorted(v) for (p, mod), v in sorted(keyed.items())}


def _progress(message: str) -> None:
    """Progress of a long phase, on stderr (stdout keeps the results)."""
    print(message, file=sys.stderr, flush=True)


def _count_params_meta(names: Sequence[str], label: str = '') -> Dict[str, Optional[int]]:
    import torch
    import timm
    out = {}
    start = time.time()
    for i, n in enumerate(names):
        if i and i % 100 == 0:
            _progress(f'  {label}counted {i} / {len(names)} architectures ({time.time() - start:.0f} s)')
        try:
            with torch.device('meta'):
                model = timm.create_model(n)
            out[n] = sum(p.numel() for p in model.parameters())
        except Exception:  # counted as unknown: sorts last
            out[n] = None
    return out


def param_counts(cache: Path, jobs: int = 1, names: Optional[Sequence[str]] = None) -> Dict[str, Optional[int]]:
    """Parameter count of every timm architecture (default config; or of `names`), built on 'meta'; cached per
    timm version. Counting them all takes minutes: progress goes to stderr."""
    import timm
    names = [n for n in (names or timm.list_models()) if not n.startswith('sila_')]
    data = {}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get('timm') != timm.__version__:
            data = {}
    counts = data.get('params', {})
    todo = [n for n in names if n not in counts]
    if todo:
        _progress(f'counting parameters of {len(todo)} architectures on the meta device to pick each family\'s '
                  f'smallest (once per timm version, cached in {cache}) ...')
        chunks = [todo[i::max(jobs, 1)] for i in range(max(jobs, 1))]
        start = time.time()
        if jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                parts = list(pool.map(_count_in_subprocess, chunks, range(jobs)))
        else:
            parts = [_count_params_meta(todo)]
        _progress(f'counted {len(todo)} architectures in {time.time() - start:.0f} s')
        for part in parts:
            counts.update(part)
        cache.parent.mkdir(parents=True, exist_ok=True)
        from timm_sila.io.atomic import atomic_write_file  # a cache: replaced whole
        atomic_write_file(cache, lambda tmp: tmp.write_text(json.dumps(dict(timm=timm.__version__, params=counts))),
                          overwrite=True)
    return counts


def _count_in_subprocess(names: List[str], job: int = 0) -> Dict[str, Optional[int]]:
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
        json.dump(names, f)
    try:  # the child's progress lines reach this stderr
        out = subprocess.run([sys.executable, __file__, '--count-params', f.name, '--count-label', f'job {job}: '],
                             stdout=subprocess.PIPE, text=True, check=True, env=_child_env(1))
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def select_archs(families: Dict[str, List[str]], counts: Dict[str, Optional[int]]) -> List[Tuple[str, str]]:
    """(family, arch) pairs: each family's smallest variant, then the paper's six not already chosen."""
    chosen = []
    for fam, names in families.items():
        best = min(names, key=lambda n: (counts.get(n) is None, counts.get(n) or 0, n))
        chosen.append((fam, best))
    fam_of = {n: fam for fam, names in families.items() for n in names}
    picked = {a for _, a in chosen}
    chosen += [(fam_of[a], a) for a in PAPER_SIX if a not in picked and a in fam_of]
    return chosen


# --- input size ----------------------------------------------------------------------------------------------
def _runs(model, size: Tuple[int, int, int]) -> bool:
    import torch
    x = torch.randn(1, *size)
    model.eval()
    with torch.no_grad():
        try:
            model(x)
            model.forward_intermediates(x)
        except Exception:
            return False
    return True


def find_input(arch: str) -> Tuple[Dict[str, Any], Tuple[int, int, int]]:
    """(create_model kwargs, (C, H, W)): the smallest square input (from SIZES) the model runs at.

    Flexible models keep their defaults; models with a fixed input size are rebuilt with img_size=S when they
    take that argument, else use their pretrained_cfg input_size.
    """
    import timm
    from timm.models import get_model_input_config
    base = timm.create_model(arch, num_classes=NUM_CLASSES)
    cfg = get_model_input_config(base)
    chans, height, width = cfg['input_size']
    pcfg = getattr(base, 'pretrained_cfg', {}) or {}
    sizes = set(s for s in SIZES if s <= max(height, width))
    if pcfg.get('min_input_size'):
        sizes.add(max(pcfg['min_input_size'][1:]))
    for s in sorted(sizes):
        kwargs, model = {}, base
        if cfg['fixed_input_size'] and (s, s) != (height, width):
            try:
                model = timm.create_model(arch, num_classes=NUM_CLASSES, img_size=s)
            except TypeError:
                break  # a fixed-size model without an img_size argument: use its own size
            except Exception:
                continue
            kwargs = {'img_size': s}
        if _runs(model, (chans, s, s)):
            return kwargs, (chans, s, s)
    return {}, (chans, height, width)


# --- checks --------------------------------------------------------------------------------------------------
class CheckFailed(AssertionError):
    """A check ran but its result is wrong."""


def _plugin_dir() -> str:
    global _PLUGIN_DIR
    if _PLUGIN_DIR is None:
        import timm_sila
        _PLUGIN_DIR = os.path.dirname(os.path.abspath(timm_sila.__file__))
    return _PLUGIN_DIR


def _one_line(text: str, limit: int = 300) -> str:
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _outcome(err: BaseException, limit: int = 300) -> Dict[str, str]:
    """'refused' for the plugin's own ValueError (a clear error), 'fail' for anything else; the reason is one line
    of at most `limit` characters."""
    if isinstance(err, CheckFailed):
        return dict(status='fail', reason=_one_line(err, limit))
    frames = traceback.extract_tb(err.__traceback__)
    raised_by_plugin = bool(frames) and os.path.abspath(frames[-1].filename).startswith(_plugin_dir())
    status = 'refused' if isinstance(err, ValueError) and raised_by_plugin else 'fail'
    return dict(status=status, reason=_one_line(f'{type(err).__name__}: {err}', limit))


def _max_diff(a, b) -> str:
    if a.shape != b.shape:
        return f'shapes {tuple(a.shape)} vs {tuple(b.shape)}'
    return f'max |diff| {(a.float() - b.float()).abs().max().item():.3g}'


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


_FRESH_SCRIPT = r'''
import json, sys
import torch, timm
from safetensors.torch import load_file
torch.set_num_threads(int(sys.argv[2]))
results = []
for item in json.loads(open(sys.argv[1]).read()):
    try:
        data = load_file(item['tensors'])
        model = timm.create_model('local-dir:' + item['dir'], pretrained=True).eval()
        with torch.no_grad():
            out = model(data['x'])
        ref = data['ref']
        if out.shape != ref.shape:
            results.append(dict(ok=False, reason=f'shape {tuple(out.shape)} != {tuple(ref.shape)}'))
        elif not torch.equal(out, ref):
            d = (out - ref).abs().max().item()
            results.append(dict(ok=False, reason=f'logits differ from the SilaNet branch 0, max |diff| {d:.3g}'))
        else:
            results.append(dict(ok=True, reason=''))
    except Exception as e:
        results.append(dict(ok=False, reason=f'{type(e).__name__}: {e}'))
if 'timm_sila' in sys.modules:
    results = [dict(ok=False, reason='the fresh process imported timm_sila') for _ in results]
print(json.dumps(results))
'''


def verify_fresh(items: Sequence[Dict[str, str]], threads: Optional[int] = None,
                 timeout: float = 600) -> List[Dict[str, Any]]:
    """Load each {'dir', 'tensors'} in ONE fresh Python process that imports timm but never timm_sila.

    `tensors` is a safetensors file with 'x' and 'ref' (expected logits); returns [{'ok', 'reason'}] per item.
    """
    import torch
    if not items:
        return []
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / 'items.json'
        spec.write_text(json.dumps(list(items)))
        env = _child_env(threads)
        env.pop('PYTHONPATH', None)
        proc = subprocess.run([sys.executable, '-c', _FRESH_SCRIPT, str(spec), str(threads)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=tmp)
    if proc.returncode != 0 or not proc.stdout.strip():
        reason = _one_line((proc.stderr.strip().splitlines() or ['no output'])[-1])
        return [dict(ok=False, reason=f'fresh process failed: {reason}') for _ in items]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_arch(arch: str, work_dir: Path, setup: Optional[Tuple[Dict[str, Any], Tuple[int, int, int]]] = None,
               fresh: bool = True, export_checks: bool = True, export_only: bool = False) -> Dict[str, Any]:
    """Run every check on sila_<arch>; returns the result record (see module docstring).

    With fresh=False the strip0 check stops after writing its folder and leaves `result['fresh_item']` for a
    caller that verifies several folders in one process with `verify_fresh` (then `finish_fresh`).
    """
    import torch
    import torch.nn.functional as F
    import timm
    import timm_sila
    from timm_sila import SilaLogits

    start = time.time()
    work_dir = Path(work_dir)
    result: Dict[str, Any] = dict(arch=arch, timm=timm.__version__, checks={})
    checks = result['checks']

    def run(name, fn):
        try:
            fn()
            checks[name] = dict(status='pass')
        except Exception as e:  # recorded, the sweep goes on
            # an export failure names each exporter's cause: room for both
            checks[name] = _outcome(e, 600 if name in EXPORT_CHECKS else 300)
        return checks[name]['status'] == 'pass'

    state: Dict[str, Any] = {}

    def build():
        kwargs, size = setup if setup is not None else find_input(arch)
        result.update(kwargs=kwargs, input_size=list(size))
        torch.manual_seed(0)
        net = timm.create_model(f'sila_{arch}', num_classes=NUM_CLASSES, **kwargs)
        result.update(taps=list(net.taps), sets=net.sets, params_base=_count(net.base), params_sila=_count(net))
        state.update(net=net, kwargs=kwargs,
                     x=torch.randn(BATCH, *size, generator=torch.Generator().manual_seed(1)))

    if not run('build', build):
        result.update(seconds=round(time.time() - start, 1))
        return finish(result)
    net, x, kwargs = state['net'], state['x'], state['kwargs']

    def train():
        net.train()
        net.zero_grad(set_to_none=True)
        out = net(x)
        if not isinstance(out, SilaLogits):
            raise CheckFailed(f'train forward returned {type(out).__name__}, not SilaLogits')
        if tuple(out.shape) != (BATCH, net.sets * NUM_CLASSES):
            raise CheckFailed(f'train logits {tuple(out.shape)}, expected {(BATCH, net.sets * NUM_CLASSES)}')
        F.cross_entropy(out, torch.arange(BATCH) % NUM_CLASSES).backward()
        for k, head in net.heads.items():
            grads = [p.grad for p in head.parameters()]
            if not grads or any(g is None for g in grads) or not any(g.abs().sum() > 0 for g in grads):
                raise CheckFailed(f'backward did not reach auxiliary head {k}')
        classifier = net.base.get_classifier()  # distilled models give (head, head_dist)
        classifier = classifier if isinstance(classifier, (tuple, list)) else [classifier]
        cls_params = [p for m in classifier if isinstance(m, torch.nn.Module) for p in m.parameters()]
        if cls_params and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in cls_params):
            raise CheckFailed('backward did not reach the base classifier (set 0)')
        net.zero_grad(set_to_none=True)

    def eval0():
        net.eval()
        net.branch = 0
        vanilla = timm.create_model(arch, num_classes=NUM_CLASSES, **kwargs)
        vanilla.load_state_dict(net.base.state_dict())
        vanilla.eval()
        with torch.no_grad():
            out, ref = net(x), vanilla(x)
        state['ref0'], state['params_vanilla'] = out, _count(vanilla)
        if out.shape != (BATCH, NUM_CLASSES) or not torch.equal(out, ref):
            raise CheckFailed(f'eval branch 0 differs from vanilla timm: {_max_diff(out, ref)}')

    def strip0():
        net.eval()
        net.branch = 0
        with torch.no_grad():
            ref = state.get('ref0')
            ref = net(x) if ref is None else ref
        out_dir = timm_sila.strip(net, branch=0, out_dir=work_dir / 'branch0', overwrite=True)
        from safetensors.torch import save_file
        tensors = work_dir / 'branch0_io.safetensors'
        save_file({'x': x.contiguous(), 'ref': ref.contiguous()}, str(tensors))
        item = dict(dir=str(out_dir), tensors=str(tensors))
        if not fresh:
            result['fresh_item'] = item
            return
        (res,) = verify_fresh([item])
        if not res['ok']:
            raise CheckFailed(f"fresh-process reload of branch 0: {res['reason']}")

    def strip1():
        net.eval()
        net.branch = 1
        try:
            with torch.no_grad():
                ref = net(x)
            out_dir = timm_sila.strip(net, branch=1, out_dir=work_dir / 'branch1', overwrite=True)
            model = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
            with torch.no_grad():
                out = model(x)
        finally:
            net.branch = 0
        base_params = state.get('params_vanilla') or _count(net.base)
        result.update(params_branch1=_count(model))
        if not torch.equal(out, ref):
            raise CheckFailed(f'reloaded branch 1 differs from the SilaNet branch 1: {_max_diff(out, ref)}')
        if _count(model) >= base_params:
            raise CheckFailed(f'stripped branch 1 has {_count(model)} params, not fewer than the base {base_params}')

    def onnx(branch):
        def check():
            from timm_sila.ship.export import export
            net.eval()
            report = export(net, branch, 'onnx', work_dir / f'branch{branch}.onnx', img_size=x.shape[-1],
                            overwrite=True)
            result.setdefault('onnx_max_abs_diff', {})[str(branch)] = report['max_abs_diff']
            result.setdefault('onnx_exporter', {})[str(branch)] = report['exporter']
            if report['exporter_reason']:  # 'dynamo failed: <step>: <root cause>' when the fallback wrote it
                result.setdefault('onnx_exporter_reason', {})[str(branch)] = report['exporter_reason']
        return check

    if not export_only:
        run('train', train)
        run('eval0', eval0)
        run('strip0', strip0)
        run('strip1', strip1)
    if export_checks or export_only:
        for k in (0, 1):
            run(f'onnx{k}', onnx(k))
    result.update(seconds=round(time.time() - start, 1))
    return finish(result)


def finish_fresh(result: Dict[str, Any], fresh_result: Dict[str, Any]) -> Dict[str, Any]:
    """Fold a `verify_fresh` answer for `result['fresh_item']` into the strip0 check."""
    result.pop('fresh_item', None)
    if result['checks'].get('strip0', {}).get('status') == 'pass' and not fresh_result['ok']:
        result['checks']['strip0'] = dict(status='fail',
                                          reason=_one_line(f"fresh-process reload of branch 0: {fresh_result['reason']}"))
    return finish(result)


def finish(result: Dict[str, Any]) -> Dict[str, Any]:
    """Overall status: 'pass' when every check passed, else the first failing check's status and reason."""
    checks = result['checks']
    first = next((c for c in CHECKS if c in checks and checks[c]['status'] != 'pass'), None)
    if first is None and all(c in checks for c in CHECKS):
        result.update(status='pass', check=None, reason='')
    elif first is None:
        result.update(status='fail', check=None, reason='not all checks ran')
    else:
        result.update(status=checks[first]['status'], check=first, reason=checks[first]['reason'])
    return result


# --- sweep driver --------------------------------------------------------------------------------------------
def _child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
        env[var] = str(threads)
    return env


def _merge_export(core: Dict[str, Any], rec: Dict[str, Any]) -> Dict[str, Any]:
    """`core` (a full record) with the ONNX checks of an --export-only run `rec` (a crash or timeout of that run
    is recorded as both ONNX checks failing with its reason)."""
    merged = dict(core, checks=dict(core['checks']))
    for c in EXPORT_CHECKS:
        merged['checks'][c] = rec['checks'].get(c) or dict(status='fail', reason=f"{rec['check']}: {rec['reason']}")
    for key in ONNX_RECORD_KEYS:  # this run's, not an earlier run's
        merged.pop(key, None)
        if rec.get(key):
            merged[key] = rec[key]
    merged['onnx_seconds'] = rec.get('seconds')
    return merged


def _run_child(arch: str, family: str, params: Optional[int], timeout: float, threads: int,
               export_checks: bool = False, export_only: bool = False) -> Dict[str, Any]:
    start = time.time()
    base = dict(arch=arch, family=family, params=params)
    with tempfile.TemporaryDirectory(prefix='sila-coverage-') as tmp:
        cmd = [sys.executable, __file__, '--child', arch, '--work', tmp, '--threads', str(threads)]
        cmd += ['--export'] if export_checks else []
        cmd += ['--export-only'] if export_only else []
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(threads))
        except subprocess.TimeoutExpired:
            return dict(base, status='fail', check='timeout', reason=f'no result within the {timeout:.0f} s limit',
                        checks={}, seconds=round(time.time() - start, 1))
    lines = [l for l in proc.stdout.splitlines() if l.startswith(_MARK)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1]
        return dict(base, status='fail', check='crash', reason=_one_line(f'process died: {tail}'), checks={},
                    seconds=round(time.time() - start, 1))
    return dict(base, **json.loads(lines[-1][len(_MARK):]))


def load_results(path: Path) -> Dict[str, Dict[str, Any]]:
    """{arch: latest record}; a line cut short (a sweep killed mid-append, a full disk) is skipped with a warning,
    so that architecture is simply run again."""
    out = {}
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                    out[rec['arch']] = rec  # later lines win (a --force rerun)
                except (ValueError, KeyError, TypeError):
                    print(f'{path}:{n}: not a whole result record, skipped (that architecture runs again)',
                          file=sys.stderr)
    return out


def _end_line(path: Path) -> None:
    """Finish a last line cut short (a killed sweep), so the next record starts a line of its own."""
    if path.is_file() and path.stat().st_size:
        with open(path, 'rb+') as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b'\n':
                f.write(b'\n')


def sweep(pairs: List[Tuple[str, str]], counts: Dict[str, Optional[int]], results_path: Path, jobs: int,
          timeout: float, threads: int, force: bool, export_checks: bool = False,
          export_only: bool = False) -> Dict[str, Dict[str, Any]]:
    import timm
    done = load_results(results_path)
    if export_only:  # add the ONNX checks to architectures whose core checks are recorded and built
        todo = [(f, a) for f, a in pairs if a in done and 'build' in done[a]['checks']
                and done[a]['checks']['build']['status'] == 'pass' and (force or 'onnx0' not in done[a]['checks'])]
    else:
        todo = [(f, a) for f, a in pairs if force or a not in done or done[a].get('timm') != timm.__version__]
    todo.sort(key=lambda fa: (counts.get(fa[1]) is None, counts.get(fa[1]) or 0))  # small (fast) models first
    what = 'get the ONNX checks' if export_only else 'to run'
    print(f'{len(pairs)} architectures selected, {len(pairs) - len(todo)} already in {results_path}, '
          f'{len(todo)} {what} with {jobs} job(s)', flush=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    _end_line(results_path)
    n = [0]

    def one(pair):
        family, arch = pair
        rec = _run_child(arch, family, counts.get(arch), timeout, threads, export_checks, export_only)
        rec.setdefault('timm', timm.__version__)
        if export_only:
            rec = _merge_export(done[arch], rec)
        with open(results_path, 'a') as f:  # one write per record; load_results skips a line cut short
            f.write(json.dumps(rec) + '\n')
        done[arch] = rec
        n[0] += 1
        where = '' if rec['status'] == 'pass' else f" {rec['check']}: {rec['reason'][:150]}"
        if any(c in rec['checks'] for c in EXPORT_CHECKS):
            where += '; ONNX b0 / b1: ' + ' / '.join(_export_cell(rec['checks'].get(c), _exporter(rec, k))
                                                     for k, c in enumerate(EXPORT_CHECKS))
        seconds = rec.get('onnx_seconds') if export_only else rec.get('seconds')
        print(f"[{n[0]}/{len(todo)}] {arch} ({family}) {rec['status']} in {seconds or 0:.0f}s{where}", flush=True)
        return rec

    with ThreadPoolExecutor(max(jobs, 1)) as pool:
        list(pool.map(one, todo))
    return done


# --- report --------------------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    return str(text).replace('|', '\\|').replace('\n', ' ')


def _grouped_table(title: str, intro: str, step: str, groups: Dict[Tuple[str, str], Dict[str, List[str]]]
                   ) -> List[str]:
    """A report section: one row per (step, root cause) with its architectures and their branches, largest first."""
    lines = [f'## {title}', '', intro, '', f'| {step} | root cause | architectures (branches) |', '|---|---|---|']
    for (stage, cause), archs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        names = ', '.join(f'{a} ({"/".join(b)})' for a, b in sorted(archs.items()))
        lines.append(f'| {stage} | {_md(cause)} | {len(archs)}: {names} |')
    return lines + ['']


def write_report(records: Dict[str, Dict[str, Any]], pairs: List[Tuple[str, str]], doc: Path,
                 command: str, sources: Sequence[Path] = ()) -> Dict[str, Any]:
    """Write the report `doc` (replacing the previous report, never one of `sources`, e.g. the results file)."""
    import timm
    import torch

    import timm_sila
    by_family = defaultdict(list)
    for family, arch in pairs:
        if arch in records:
            by_family[family].append(records[arch])
    fam_status = {}
    for family, recs in by_family.items():
        statuses = {r['status'] for r in recs}
        fam_status[family] = 'pass' if statuses == {'pass'} else ('fail' if 'fail' in statuses else 'refused')
    not_run = sorted({f for f, _ in pairs} - set(fam_status))
    total = len(fam_status)
    passed = sum(s == 'pass' for s in fam_status.values())
    refused = sum(s == 'refused' for s in fam_status.values())
    tried = sum(len(v) for v in by_family.values())
    arch_pass = sum(r['status'] == 'pass' for v in by_family.values() for r in v)
    exported = {f: recs for f, recs in by_family.items() if all('onnx0' in r['checks'] for r in recs)}
    onnx_ok = {k: sum(all(r['checks'].get(f'onnx{k}', {}).get('status') == 'pass' for r in recs)
                      for recs in exported.values()) for k in (0, 1)}
    fallback = defaultdict(lambda: defaultdict(list))  # dynamo's blanked cause -> {arch: [branches TorchScript wrote]}
    for recs in exported.values():
        for r in recs:
            for k, c in enumerate(EXPORT_CHECKS):
                if r['checks'][c]['status'] == 'pass' and _exporter(r, k) == 'torchscript':
                    why = r.get('onnx_exporter_reason', {}).get(str(k), '')
                    fallback[_dynamo_cause(why)][r['arch']].append(f'b{k}')
    onnx_ts = {k: sum(any(_exporter(r, k) == 'torchscript' for r in recs) and
                      all(r['checks'].get(f'onnx{k}', {}).get('status') == 'pass' for r in recs)
                      for recs in exported.values()) for k in (0, 1)}
    export_classes = defaultdict(lambda: defaultdict(list))  # (stage, cause) -> {arch: [failing branches]}
    for recs in exported.values():
        for r in recs:
            for k, c in enumerate(EXPORT_CHECKS):
                if r['checks'][c]['status'] != 'pass':
                    export_classes[_export_failure(r['checks'][c]['reason'])][r['arch']].append(f'b{k}')
    classes = defaultdict(list)
    for recs in by_family.values():
        for r in recs:
            if r['status'] != 'pass':
                classes[(r['status'], r['check'], _failure_class(r['reason']))].append(r['arch'])
    lines = [
        '# Coverage: timm architectures as SilaNets',
        '',
        f'Generated by `{command}` on {datetime.date.today().isoformat()} with timm {timm.__version__}, '
        f'torch {torch.__version__} (CPU), timm-sila {timm_sila.__version__}.',
        '',
        f'**{passed} / {total} families pass all checks ({100.0 * passed / max(total, 1):.1f} %)**; '
        f'{refused} refused with a clear error, {total - passed - refused} fail. '
        f'{tried} architectures tried ({arch_pass} pass): the smallest variant of each of the {total} families '
        f'plus the paper\'s six ({", ".join(PAPER_SIX)}).'
        + (f' Not run yet: {len(not_run)} families ({", ".join(not_run[:10])}{", ..." if len(not_run) > 10 else ""}).'
           if not_run else ''),
        '',
        f'**ONNX export** (`timm_sila.export(..., format="onnx")`, onnxruntime parity; run for {len(exported)} of '
        f'the {total} families, those swept with `--export` or `--export-only`): branch 0 passes for {onnx_ok[0]} / {len(exported)}, '
        f'branch 1 for {onnx_ok[1]} / {len(exported)} ({onnx_ts[0]} and {onnx_ts[1]} of them written by the '
        f'TorchScript exporter after the dynamo exporter failed).',
        '',
        'Checks, in order (a row shows the first one that did not pass):',
        '',
        '- **build**: `timm.create_model("sila_<arch>", num_classes=10)` at the smallest square input the model '
        'runs at (`img_size=` for fixed-size models that take it, else their own input size);',
        '- **train**: train-mode forward returns `SilaLogits` of shape (B, M·N); backward reaches every auxiliary '
        'head and the base classifier;',
        '- **eval0**: eval branch 0 is bitwise equal (`torch.equal`) to vanilla timm with the same weights;',
        '- **strip0**: `timm_sila.strip(net, branch=0)` reloads with `timm.create_model("local-dir:...", '
        'pretrained=True)` in a fresh process that never imports timm_sila, bitwise equal;',
        '- **strip1**: `strip(net, branch=1)` reloads (after `import timm_sila`) bitwise equal to branch 1, with '
        'fewer parameters than the base.',
        '',
        'Deployment checks, in their own column (`ONNX b0 / b1`; not part of the result): **onnx0**, **onnx1**: '
        '`timm_sila.export(net, k, "onnx")` exports branch k with torch.onnx (opset 18), reloads it in '
        'onnxruntime and compares with PyTorch at batch 2 and 1 (max |delta| <= 1e-4 * max(1, max |logit|)). '
        'The dynamo exporter is tried first; when it fails (to trace, convert, load or match), the TorchScript '
        'exporter, under the same check: `ok` = dynamo wrote the file, `ok (torchscript)` = the fallback did. '
        'A failure names what torch or onnxruntime could not do, with each exporter\'s cause.',
        '',
        '`refused` = the plugin raised its own clear error for something timm does not provide for that model; '
        '`fail` = anything else (including `timeout` and `crash` of the per-model process). Families are '
        '(name prefix, timm module): the prefix is the name up to the first `_` with trailing variant numbers '
        'dropped and versions `vN` kept (`resnet50d` -> `resnet`, `mobilenetv3_large_100` -> `mobilenetv3`); '
        'a prefix used by several timm modules is split and shown as `prefix (module)`. The smallest variant is '
        'the one with the fewest parameters (counted on the `meta` device).',
        '',
        'Re-run after core changes: `python benchmarks/coverage.py --jobs 2 --export` (one subprocess per '
        'architecture, '
        '`--timeout` seconds each; resumable: results are appended to `runs/coverage/results.jsonl` and '
        'architectures already there are skipped, `--force` re-runs them; `--families`/`--archs`/`--limit` run a '
        'part, `--report-only` rewrites this file).',
        '',
    ]
    if classes:
        lines += ['## Failure classes', '', '| result | check | reason (numbers and names blanked) | architectures |',
                  '|---|---|---|---|']
        for (status, check, reason), archs in sorted(classes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f'| {status} | {check} | {_md(reason)} | {len(archs)}: {", ".join(sorted(archs))} |')
        lines.append('')
    if fallback:
        lines += _grouped_table(
            'ONNX exports written by the TorchScript fallback',
            'Branches the dynamo exporter could not export, grouped by its root cause (numbers and names blanked); the '
            'TorchScript exporter wrote them and they passed the same parity check.', 'dynamo failed at', fallback)
    if export_classes:
        lines += _grouped_table(
            'ONNX export failures',
            'Grouped by the step that failed and its root cause (numbers and names blanked). A failure of branch 0, '
            'the unchanged timm model, is torch\'s or the architecture\'s, not the plugin\'s.', 'failing step',
            export_classes)
    lines += ['## Families', '',
              '| family | architecture | params | input | sets / taps | result | reason | ONNX b0 / b1 |',
              '|---|---|---|---|---|---|---|---|']
    for family in sorted(by_family, key=str.lower):
        for r in sorted(by_family[family], key=lambda r: r['arch']):
            size = 'x'.join(str(s) for s in r.get('input_size', [])[1:]) or '-'
            if r.get('kwargs'):
                size += ' (' + ', '.join(f'{k}={v}' for k, v in r['kwargs'].items()) + ')'
            params = f"{r['params'] / 1e6:.2f} M" if r.get('params') else '-'
            taps = f"{r['sets']}: {', '.join(r['taps'])}" if r.get('taps') else '-'
            res = 'pass' if r['status'] == 'pass' else f"{r['status']}: {r['check']}"
            onnx = ' / '.join(_export_cell(r['checks'].get(c), _exporter(r, k)) for k, c in enumerate(EXPORT_CHECKS))
            lines.append(f"| {_md(family)} | {r['arch']} | {params} | {size} | {_md(taps)} | {res} | "
                         f"{_md(r.get('reason', ''))} | {onnx} |")
    doc.parent.mkdir(parents=True, exist_ok=True)
    from timm_sila.io.atomic import atomic_write_file  # whole report or the previous one
    atomic_write_file(doc, lambda tmp: tmp.write_text('\n'.join(lines) + '\n'), overwrite=True, sources=sources)
    return dict(families=total, passed=passed, refused=refused, tried=tried)


def _export_cell(check: Optional[Dict[str, str]], exporter: str = 'dynamo') -> str:
    if check is None:
        return '-'
    if check['status'] != 'pass':
        return 'fail'
    return 'ok' if exporter == 'dynamo' else f'ok ({exporter})'


def _exporter(record: Dict[str, Any], branch: int) -> str:
    """The exporter that wrote branch `branch`'s ONNX file ('dynamo' for records from before the fallback)."""
    return record.get('onnx_exporter', {}).get(str(branch), 'dynamo')


def _dynamo_cause(reason: str) -> Tuple[str, str]:
    """(step, blanked root cause) of an exporter_reason 'dynamo failed: <step>: <Type: root cause>'."""
    text = reason.split('dynamo failed: ', 1)[-1]
    step, _, cause = text.partition(': ')
    if step not in ('torch.export', 'torch.onnx') and not step.startswith('onnxruntime'):
        step, cause = 'parity or running the file', text
    return step, _group_prefix(cause)


def _failure_class(reason: str, limit: int = 160) -> str:
    """A reason with numbers, names and quoted values blanked, so like failures group together."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r'\[[^\]]*\]', '[…]', text)
    text = re.sub(r'\d+(\.\d+)?(e-?\d+)?', 'N', text)
    return _one_line(text, limit)


# (text in an export failure, the step it names) in pipeline order; see timm_sila.export
_EXPORT_STEPS = (('Neither ONNX exporter', 'dynamo, then torchscript'),
                 ('torch.export cannot trace', 'torch.export tracing'),
                 ('Failed to decompose', 'torch.onnx FX decomposition'),
                 ('Failed to convert the exported program', 'torch.onnx conversion'),
                 ('onnxruntime cannot load', 'onnxruntime loading'),
                 ('fails to run', 'running the exported file'),
                 ('disagrees with PyTorch', 'parity'))


def _export_failure(reason: str) -> Tuple[str, str]:
    """(failing step, blanked root cause) of an export check's reason, so like failures group together."""
    step = next((name for text, name in _EXPORT_STEPS if text in reason), 'other')
    reason = re.sub(r'\s*\[[\w.]+\.py:\d+\]$', '', reason)  # the "[file.py:line]" of _outcome
    if step == 'dynamo, then torchscript':  # '... dynamo: <cause>; torchscript: <cause>. Nothing was written.'
        dynamo, _, torchscript = reason.split(': dynamo: ', 1)[-1].partition('; torchscript: ')
        torchscript = torchscript.rsplit(' Nothing was written.', 1)[0]
        return step, f'dynamo: {_group_prefix(dynamo)}; torchscript: {_group_prefix(torchscript)}'
    cause = reason.split(' Cause: ', 1)[1] if ' Cause: ' in reason else reason.split(': ', 2)[-1]
    return step, _group_prefix(cause)


def _group_prefix(cause: str, limit: int = 80) -> str:
    """`cause` blanked (`_failure_class`) and cut to `limit` characters: recorded reasons are cut at a fixed length,
    so a long cause keeps a varying tail; like failures group on a fixed prefix."""
    cause = _failure_class(cause)
    return cause if len(cause) <= limit else cause[:limit].rstrip() + ' …'


# --- command line --------------------------------------------------------------------------------------------
def _child_main(arch: str, work: str, threads: int, export_checks: bool, export_only: bool) -> None:
    import warnings
    import torch
    warnings.filterwarnings('ignore')
    torch.set_num_threads(threads)
    rec = check_arch(arch, Path(work), export_checks=export_checks, export_only=export_only)
    print(_MARK + json.dumps(rec), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--families', help='comma-separated family labels or prefixes (default: all)')
    p.add_argument('--archs', help='comma-separated architectures to check instead of the family selection')
    p.add_argument('--limit', type=int, help='check at most this many architectures (in family order)')
    p.add_argument('--jobs', type=int, default=1, help='architectures checked at once (default 1)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per architecture (default 1)')
    p.add_argument('--timeout', type=float, default=600, help='seconds allowed per architecture (default 600)')
    p.add_argument('--force', action='store_true', help='re-run architectures already in the results file')
    p.add_argument('--results', type=Path, default=DEFAULT_RESULTS, help=f'JSON lines (default {DEFAULT_RESULTS})')
    p.add_argument('--doc', type=Path, default=DEFAULT_DOC, help=f'report to write (default {DEFAULT_DOC})')
    p.add_argument('--no-doc', action='store_true', help='do not write the report')
    p.add_argument('--report-only', action='store_true', help='write the report from the results file only')
    p.add_argument('--export', action='store_true',
                   help='also export branches 0 and 1 to ONNX and check them in onnxruntime (about doubles the time)')
    p.add_argument('--export-only', action='store_true',
                   help='add the ONNX checks to architectures already in the results (core checks kept)')
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--work', help=argparse.SUPPRESS)
    p.add_argument('--count-params', help=argparse.SUPPRESS)
    p.add_argument('--count-label', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        _child_main(args.child, args.work, args.threads, args.export, args.export_only)
        return 0
    if args.count_params:
        print(json.dumps(_count_params_meta(json.loads(Path(args.count_params).read_text()), args.count_label)))
        return 0
    if args.report_only and not load_results(args.results):
        print(f'coverage.py: error: --report-only needs the results of a sweep, and {args.results} '
              f'{"holds none" if args.results.is_file() else "does not exist"} (runs/ is not in git); run the '
              f'sweep first (python benchmarks/coverage.py --jobs 2) or pass --results FILE. {args.doc} was left '
              f'as it is.', file=sys.stderr)
        return 2

    import warnings
    warnings.filterwarnings('ignore')
    _progress('listing timm architectures and their families ...')
    families = family_map()
    cache = args.results.parent / 'params.json'
    if args.archs and not cache.is_file():
        counts = {}  # explicit architectures need no family selection
    else:
        counts = param_counts(cache, jobs=args.jobs)
    pairs = select_archs(families, counts)
    if args.families:
        wanted = [w.strip() for w in args.families.split(',') if w.strip()]
        pairs = [(f, a) for f, a in pairs if any(f == w or f.split(' ')[0] == w for w in wanted)]
    if args.archs:
        fam_of = {n: f for f, names in families.items() for n in names}
        pairs = [(fam_of.get(a, '?'), a) for a in (s.strip() for s in args.archs.split(',')) if a]
    if args.limit:
        pairs = pairs[:args.limit]
    write_doc = not args.no_doc and not args.families and not args.archs and not args.limit
    if write_doc:  # before the sweep: the report may replace the last report, never the results it is made from
        from timm_sila.io.atomic import check_output_file
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_output_file(args.doc, True, [args.results])
        except (OSError, ValueError) as e:
            print(f'coverage.py: error: {e}', file=sys.stderr)
            return 2
    if not args.report_only:
        records = sweep(pairs, counts, args.results, args.jobs, args.timeout, args.threads, args.force, args.export,
                        args.export_only)
    else:
        records = load_results(args.results)
    if write_doc:
        summary = write_report(records, select_archs(families, counts), args.doc,
                               'python benchmarks/coverage.py --jobs 2 --export',
                               sources=[args.results])
        print(f"{summary['passed']} / {summary['families']} families pass ({summary['refused']} refused), "
              f"{summary['tried']} architectures; report: {args.doc}")
    else:
        sel = [records[a] for _, a in pairs if a in records]
        print(f"{sum(r['status'] == 'pass' for r in sel)} / {len(sel)} selected architectures pass "
              f"(report not rewritten for a partial selection)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
