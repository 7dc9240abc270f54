"""SilaNet overhead over the plain timm model, measured as side-by-side ratios in one run.

Every timing row runs A (SilaNet) and B (plain timm model with the same weights) alternately (A B B A ...) after
warm-up and reports median(A) / median(B), so load from other processes hits both sides alike. Memory rows run
one training step per configuration in a fresh subprocess. Runs on CUDA automatically when it is available.

    python benchmarks/overhead.py            # full table (~5-10 min on 2 CPU cores)
    python benchmarks/overhead.py --quick    # fewer repeats, fast heads only, smoke check
    python benchmarks/overhead.py --only create_model  # construction time only (~2 min)
    python benchmarks/overhead.py --profile resnet18@224  # torch.profiler table of one Sila and one base step
    python benchmarks/overhead.py --components resnet18@224  # isolated cost of each Sila-only piece
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# (arch, image size, classes, batch) of the training rows
TRAIN_CONFIGS = [
    ('resnet18', 224, 1000, 16),
    ('resnet18', 32, 10, 128),
    ('vit_tiny_patch16_224', 224, 1000, 16),
]
EVAL_CONFIGS = [
    ('resnet18', 224, 1000, 16),
    ('vit_tiny_patch16_224', 224, 1000, 16),
]
# (arch, classes) of the construction rows: timm.create_model('sila_<arch>') / timm.create_model('<arch>')
CREATE_CONFIGS = [(arch, classes) for classes in (1000, 10)
                  for arch in ('resnet50', 'convnext_base', 'vit_base_patch16_224')]
GOALS = {'train': 1.03, 'eval0': 1.01, 'import': 0.2, 'create': 1.15}


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _model_kwargs(arch, size):
    return {'img_size': size} if arch.startswith(('vit_', 'deit_', 'swin_')) and size != 224 else {}


def build_pair(arch, size, classes, head='conv3x3', branch=0, stripped=False, device='cpu'):
    """(SilaNet, plain timm model carrying the SilaNet's base weights), both on `device`."""
    import timm
    import timm_sila  # noqa: F401
    torch.manual_seed(0)
    kwargs = _model_kwargs(arch, size)
    sila = timm.create_model(f'sila_{arch}', num_classes=classes, sila_head=head, **kwargs)
    base = timm.create_model(arch, num_classes=classes, **kwargs)
    base.load_state_dict(sila.base.state_dict())
    if stripped:
        full = sila
        sila = timm.create_model(f'sila_{arch}', num_classes=classes, sila_head=head, sila_branch=branch,
                                 sila_stripped=True, **kwargs)
        state = full.state_dict()
        sila.load_state_dict({k: state[k] for k in sila.state_dict()})
    else:
        sila.branch = branch
    return sila.to(device), base.to(device)


def _batch(size, classes, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def train_step_fn(model, x, y):
    """One training step: forward, criterion (Sila loss on SilaLogits, plain CE otherwise), backward, SGD step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def eval_fn(model, x):
    model.eval()

    def fwd():
        with torch.inference_mode():
            model(x)
    return fwd


def create_fn(name, classes):
    """A function that builds `name` with fresh random weights (what timm.create_model costs without a download)."""
    import timm
    import timm_sila  # noqa: F401

    def create():
        timm.create_model(name, num_classes=classes)
    return create


def alternate(fn_a, fn_b, repeats, warmup, device):
    """Median seconds of A and B, run alternately (A B, then B A, ...) after `warmup` runs of each."""
    for _ in range(warmup):
        fn_a(), fn_b()
    _sync(device)
    times = {'a': [], 'b': []}
    for r in range(repeats):
        order = (('a', fn_a), ('b', fn_b)) if r % 2 == 0 else (('b', fn_b), ('a', fn_a))
        for key, fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return statistics.median(times['a']), statistics.median(times['b'])


# --- memory: one training step in a fresh process ---------------------------------------------------------------
def _rss_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def memory_child(arch, size, classes, batch, which, head, device, threads=1):
    """Peak extra memory (MiB) of one steady-state training step of `which` ('sila' or 'base')."""
    device = torch.device(device)
    if device.type == 'cpu':
        torch.set_num_threads(threads)
    sila, base = build_pair(arch, size, classes, head=head, device=device)
    model = sila if which == 'sila' else base
    del sila, base
    x, y = _batch(size, classes, batch, device)
    step = train_step_fn(model, x, y)
    step()  # warm-up: optimizer state, allocator / oneDNN caches
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    before = _rss_kib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:  # resets VmHWM (peak RSS) to the current RSS
        f.write('5')
    step()
    return (_rss_kib('VmHWM') - before) / 1024


def measure_memory(cfg, which, head, device, threads=1):
    arch, size, classes, batch = cfg
    env = dict(os.environ)
    # a fixed mmap threshold makes glibc return freed tensor memory to the OS, so RSS follows live tensors
    env.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
    env.setdefault('MALLOC_TRIM_THRESHOLD_', '65536')
    cmd = [sys.executable, __file__, '--_memory-child', json.dumps([arch, size, classes, batch, which, head, str(device), threads])]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


# --- import time --------------------------------------------------------------------------------------------------
_IMPORT_SNIPPET = (
    'import time; t = time.perf_counter(); import {first}; a = time.perf_counter() - t; {second}'
    'print(a, time.perf_counter() - t - a)')


def _import_seconds(first, then_sila=False):
    code = _IMPORT_SNIPPET.format(first=first, second='import timm_sila; ' if then_sila else '')
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    a, b = map(float, out.split())
    return a, b


def measure_import(repeats):
    """(median import timm_sila - median import timm over alternated fresh processes, median in-process increment)."""
    sila, plain, increment = [], [], []
    for r in range(repeats):
        for which in (('sila', 'timm') if r % 2 == 0 else ('timm', 'sila')):
            if which == 'sila':
                sila.append(_import_seconds('timm_sila')[0])
            else:
                a, b = _import_seconds('timm', then_sila=True)
                plain.append(a)
                increment.append(b)
    return (statistics.median(sila), statistics.median(plain), statistics.median(increment))


# --- profiling -----------------------------------------------------------------------------------------------------
def profile(spec, head, device, rows=25):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    arch, size = spec.split('@')
    size = int(size)
    cfg = next((c for c in TRAIN_CONFIGS if c[0] == arch and c[1] == size), (arch, size, 1000, 16))
    _, _, classes, batch = cfg
    sila, base = build_pair(arch, size, classes, head=head, device=device)
    x, y = _batch(size, classes, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sort = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    for name, model in (('sila', sila), ('base', base)):
        step = train_step_fn(model, x, y)
        step(), step()
        with torch_profile(activities=activities) as prof:
            step()
            _sync(device)
        print(f'\n=== {name}: {arch} @{size} N={classes} B={batch} head={head} ===')
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def _median_ms(fn, runs=9):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def components(spec, device):
    """Isolated cost of each Sila-only piece of a train step (heads, tap gradient sums, their SGD step, loss)."""
    from timm_sila.loss.logits import wrap_sila_logits
    arch, size = spec.split('@')
    size = int(size)
    _, _, classes, batch = next((c for c in TRAIN_CONFIGS if c[0] == arch and c[1] == size), (arch, size, 1000, 16))
    sila, base = build_pair(arch, size, classes, device=device)
    x, y = _batch(size, classes, batch, device)
    sila.train()
    with torch.no_grad():
        _, feats = sila._tap_features(x)
    rows = []
    for k, feat in enumerate(feats, start=1):
        head = sila.heads[str(k)]

        def head_step(feat=feat, head=head):
            head(feat.detach().requires_grad_(True)).sum().backward()
        rows.append((f'head {k} forward + backward on {tuple(feat.shape)}', _median_ms(head_step)))
        g1, g2 = torch.randn_like(feat), torch.randn_like(feat)
        rows.append((f'gradient accumulation at tap {k} {tuple(feat.shape)}', _median_ms(lambda a=g1, b=g2: a + b)))
    for name, params in (('heads', list(sila.heads.parameters())), ('(reference) base', list(base.parameters()))):
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        rows.append((f'SGD step over {name} ({sum(p.numel() for p in params) / 1e6:.2f} M params)',
                     _median_ms(opt.step)))
    logits = torch.randn(batch, sila.sets * classes, device=device)

    def sila_loss():
        F.cross_entropy(wrap_sila_logits(logits.clone().requires_grad_(True), classes, sila.beta, sila.decay),
                        y).backward()

    def plain_loss():
        F.cross_entropy(logits[:, :classes].clone().requires_grad_(True), y).backward()
    rows += [(f'Sila loss forward + backward ({sila.sets * classes} logits)', _median_ms(sila_loss)),
             ('(reference) plain cross-entropy forward + backward', _median_ms(plain_loss))]
    print(f'{arch} @{size} N={classes} B={batch}, {device}, {torch.get_num_threads()} thread(s)')
    for name, ms in rows:
        print(f'{name:<64} {ms:8.2f} ms')


# --- main ------------------------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=None, help='timed runs of each side (default 7, quick 3)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs of each side first')
    parser.add_argument('--quick', action='store_true', help='3 repeats, fast heads only, fewer import runs')
    parser.add_argument('--device', default=None, help="default: 'cuda' when available, else 'cpu'")
    parser.add_argument('--threads', type=int, default=None,
                        help='CPU threads (default 1 on CPU: on a shared machine a multi-threaded op waits for its '
                             'slowest thread, which magnifies noise; the ratios are what is measured)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory rows')
    parser.add_argument('--no-import', action='store_true', help='skip the import-time row')
    parser.add_argument('--only', default=None, help="only rows whose label contains this text, e.g. 'vit'")
    parser.add_argument('--profile', default=None, metavar='ARCH@SIZE',
                        help='print torch.profiler tables for one Sila and one base train step instead')
    parser.add_argument('--components', default=None, metavar='ARCH@SIZE',
                        help='time each Sila-only piece of a train step in isolation instead')
    parser.add_argument('--head', default='conv3x3', help='head for --profile (conv3x3 or conv3x3_literal)')
    parser.add_argument('--_memory-child', dest='memory_child', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        print(memory_child(*json.loads(args.memory_child)))
        return

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if args.threads or device.type == 'cpu':
        torch.set_num_threads(args.threads or 1)
    if args.components:
        components(args.components, device)
        return
    if args.profile:
        profile(args.profile, args.head, device)
        return
    repeats = args.repeats or (3 if args.quick else 7)
    heads = ('conv3x3',) if args.quick else ('conv3x3', 'conv3x3_literal')
    print(f'device={device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={repeats} '
          f'warmup={args.warmup}', flush=True)
    rows = []

    def emit(label, a, b, ratio, unit, goal=None):
        mark = '' if goal is None else ('ok' if ratio <= goal else f'MISSED (goal <= {goal})')
        rows.append((label, a, b, ratio, unit, mark))
        fmt = '.3f' if unit == 's' else '.1f'
        print(f'{label:<58} {a:>9{fmt}} {b:>9{fmt}} {ratio:>8.3f}{"x" if unit != "s diff" else " s"} {mark}',
              flush=True)

    def wanted(label):
        return args.only is None or args.only in label

    print(f'{"row (A / B)":<58} {"A":>9} {"B":>9} {"A/B":>9}')
    for arch, size, classes, batch in TRAIN_CONFIGS:
        for head in heads:
            label = f'train step Sila/base {arch}@{size} N={classes} B={batch} {head}'
            if not wanted(label):
                continue
            sila, base = build_pair(arch, size, classes, head=head, device=device)
            x, y = _batch(size, classes, batch, device)
            a, b = alternate(train_step_fn(sila, x, y), train_step_fn(base, x, y), repeats, args.warmup, device)
            emit(label, a, b, a / b, 's', GOALS['train'] if head == 'conv3x3' else None)
            del sila, base
            gc.collect()

    for arch, size, classes, batch in EVAL_CONFIGS:
        label = f'eval fwd branch 0 / vanilla {arch}@{size} B={batch}'
        if wanted(label):
            sila, base = build_pair(arch, size, classes, device=device)
            x, _ = _batch(size, classes, batch, device)
            a, b = alternate(eval_fn(sila, x), eval_fn(base, x), repeats, args.warmup, device)
            emit(label, a, b, a / b, 's', GOALS['eval0'])
        label = f'eval fwd stripped branch 1 / vanilla {arch}@{size} B={batch}'
        if wanted(label):
            sila, base = build_pair(arch, size, classes, branch=1, stripped=True, device=device)
            x, _ = _batch(size, classes, batch, device)
            a, b = alternate(eval_fn(sila, x), eval_fn(base, x), repeats, args.warmup, device)
            emit(label, a, b, a / b, 's')
        gc.collect()

    for arch, classes in CREATE_CONFIGS:
        label = f'create_model sila_{arch} / {arch} N={classes}'
        if wanted(label):
            import timm
            import timm_sila  # noqa: F401  (registers sila_*)
            with torch.device('meta'):
                counts = [sum(p.numel() for p in timm.create_model(n, num_classes=classes).parameters())
                          for n in (f'sila_{arch}', arch)]
            label += f' (params {counts[0] / counts[1]:.2f}x)'
            a, b = alternate(create_fn(f'sila_{arch}', classes), create_fn(arch, classes), repeats, args.warmup,
                             torch.device('cpu'))
            emit(label, a, b, a / b, 's', GOALS['create'])
            gc.collect()

    if not args.no_memory:
        method = 'cuda max_memory_allocated' if device.type == 'cuda' else 'peak RSS growth, fresh process'
        for cfg in TRAIN_CONFIGS:
            # the literal head's memory is measured where it matters most (the 56x56 tap of resnet18 @224)
            for head in heads if cfg == TRAIN_CONFIGS[0] else heads[:1]:
                label = f'peak mem MiB Sila/base {cfg[0]}@{cfg[1]} B={cfg[3]} {head}'
                if not wanted(label):
                    continue
                a = measure_memory(cfg, 'sila', head, device, torch.get_num_threads())
                b = measure_memory(cfg, 'base', head, device, torch.get_num_threads())
                emit(label, a, b, a / b, 'MiB')
        print(f'(memory method: {method})')

    if not args.no_import and wanted('import'):
        n = 3 if args.quick else max(5, repeats)
        sila, plain, increment = measure_import(n)
        emit('import timm_sila - import timm (fresh processes) s', sila, plain, sila - plain, 's diff',
             GOALS['import'])
        emit('import timm_sila after timm, same process (increment) s', plain + increment, plain, increment,
             's diff', GOALS['import'])

    missed = [r[0] for r in rows if r[5].startswith('MISSED')]
    print(f'\n{len(rows)} rows; goals missed: {missed if missed else "none"}')


if __name__ == '__main__':
    main()
