"""Base vs Sila side by side on CIFAR-10 (paper Table 1 setting), same recipe, several seeds.

Each seed runs `examples/train_cifar.py --also-base` in its own process: the SilaNet and its plain base model
start from the same weights, see the same batches, crops and flips, and alternate epoch by epoch (so machine
load hits both alike). Reports mean +- std over seeds of base ACC1, Sila ACC1/ACC2/ACC3, the paired deltas,
top-1..5 of each, params / MB / CR per branch and the training wall-clock per epoch ratio Sila / base.

    python benchmarks/reproduce_cifar10.py                      # CUDA present -> GPU protocol, else CPU protocol
    python benchmarks/reproduce_cifar10.py --protocol cpu       # < 60 min on 2 CPU cores (see PROTOCOLS)
    python benchmarks/reproduce_cifar10.py --protocol paper     # 260 epochs, paper milestones (GPU, hours)

The test split is only reported: nothing is tuned on it (beta/lambda are the paper's Table 1 values).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from timm_sila.io.atomic import atomic_write_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / 'examples' / 'train_cifar.py'
DEFAULT_DATA = ROOT.parent / 'shared' / 'data' / 'cifar10'

# Every protocol: ResNet18 (the paper's CIFAR-10 model of Table 1, beta 0.1, lambda 0.5) at 32x32 on the full
# 50k/10k split, timm's ImageNet stem (no CIFAR stem), SGD momentum 0.9 lr 0.1 wd 5e-4, batch 128, milestones
# [30, ..., 240] scaled to the epochs ('scaled') or as published ('paper'), lr x0.5 at each.
PROTOCOLS = {
    # Converged evidence, part (a): timm's test_resnet (374k params, ResNet layout: same taps as ResNet18) small
    # enough to reach its plateau on a CPU; 5 seeds, a held-out 10 % of train (calibration / tuning, never test).
    # Settings from benchmarks/cpu_train_speed.py (docs/performance.md): two single-threaded processes, and
    # channels_last for test_resnet (1.48x the NCHW throughput; no gain for resnet18).
    'small': dict(model='sila_test_resnet', epochs=12, seeds=[0, 1, 2, 3, 4], recipe='scaled', jobs=2, threads=1,
                  val_fraction=0.1, channels_last=True),
    # Part (b): the paper's ResNet18 under the same protocol, on the paper's own 260-epoch schedule so that a run
    # can grow: `--epochs N` continues the per-seed states of a shorter run (cost per epoch: docs/results.md).
    'resnet18': dict(model='sila_resnet18', epochs=4, seeds=[0, 1, 2], recipe='paper', jobs=2, threads=1,
                     val_fraction=0.1),
    # A short look at ResNet18 on 2 CPU cores: one torch thread per process, the three seeds as parallel processes
    # (a 128-image step takes about 1.4 s on one idle core: docs/results.md, "Cost of a training step").
    'cpu': dict(model='sila_resnet18', epochs=2, seeds=[0, 1, 2], recipe='scaled', jobs=3, threads=1),
    # One GPU, ~8 minutes: 3 seeds x 15 epochs x (base + Sila), the seeds as parallel processes on one device.
    'gpu': dict(model='sila_resnet18', epochs=15, seeds=[0, 1, 2], recipe='scaled', jobs=3, threads=4),
    # The paper's schedule (260 epochs); hours on a GPU.
    'paper': dict(model='sila_resnet18', epochs=260, seeds=[0, 1, 2], recipe='paper', jobs=3, threads=4),
}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values, digits=2):
    m, s = mean_std(values)
    return '-' if m is None else f'{m:.{digits}f} ± {s:.{digits}f}'


def run_seeds(cfg, args, out: Path):
    """Launch one train_cifar.py process per seed, `jobs` at a time; returns {seed: results dict}."""
    pending = list(cfg['seeds'])
    running = {}
    results = {}
    while pending or running:
        while pending and len(running) < cfg['jobs']:
            seed = pending.pop(0)
            seed_out = out / f'seed{seed}'
            seed_out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(TRAIN), '--data-dir', str(args.data_dir), '--model', cfg['model'],
                   '--also-base', '--epochs', str(cfg['epochs']), '--recipe', cfg['recipe'], '--seed', str(seed),
                   '--img-size', str(args.img_size), '--batch-size', str(args.batch_size),
                   '--out', str(seed_out), '--threads', str(cfg['threads']), '--cache', str(args.cache),
                   '--no-progress', '--val-fraction', str(cfg.get('val_fraction', 0.0)),
                   '--state', str(args.state_dir / f'seed{seed}.pt')]
            if args.device:
                cmd += ['--device', args.device]
            if args.channels_last if args.channels_last is not None else cfg.get('channels_last'):
                cmd += ['--channels-last']
            if args.limit:
                cmd += ['--limit', str(args.limit)]
            log = open(seed_out / 'stdout.log', 'a')
            print(f'seed {seed}: {" ".join(cmd)}', flush=True)
            running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(5)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[seed]
            if proc.returncode:
                tail = (out / f'seed{seed}' / 'stdout.log').read_text()[-2000:]
                raise SystemExit(f'seed {seed} failed (exit {proc.returncode}):\n{tail}')
            with open(out / f'seed{seed}' / 'results.json') as f:
                results[seed] = json.load(f)
            print(f'seed {seed} done', flush=True)
    return results


# two-sided 95 % Student t quantiles t_{0.975, df}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def paired_ci(deltas):
    """Mean, std and the 95 % paired-t confidence interval of per-seed differences; significant = 0 outside it."""
    n = len(deltas)
    mean = statistics.fmean(deltas)
    if n < 2:
        return dict(mean=mean, std=None, ci95=None, significant=None, n=n)
    std = statistics.stdev(deltas)
    t = T975[max(k for k in T975 if k <= n - 1)]
    half = t * std / n ** 0.5
    return dict(mean=mean, std=std, ci95=[mean - half, mean + half], significant=not (mean - half <= 0 <= mean + half),
                n=n)


def plateau(rows, key, fraction=0.2):
    """Range (max - min) and least-squares slope per epoch of `key` over the last `fraction` of the epochs."""
    tail = rows[-max(2, math.ceil(fraction * len(rows))):]
    xs, ys = [r['epoch'] for r in tail], [r[key] for r in tail]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return dict(epochs=[xs[0], xs[-1]], range=max(ys) - min(ys), slope_per_epoch=slope)


def epoch_curves(out: Path, seeds, model: str):
    """Per-epoch test top-1 of every seed from its log.json: {'base ACC1': [[...per epoch] per seed], ...}."""
    curves = {}
    for seed in seeds:
        rows = json.loads((out / f'seed{seed}' / 'log.json').read_text())['epochs']
        for row in rows:
            for k, v in row.items():
                if k.startswith('ACC') or k == 'ENS':
                    name = f"{'base' if row['run'] == 'base' else 'Sila'} {k}"
                    curves.setdefault(name, {}).setdefault(seed, []).append((row['epoch'], v))
    return curves


def plot_curves(curves, path: Path, title: str):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, per_seed in curves.items():
        if name.endswith('ENS'):
            continue
        seeds = sorted(per_seed)
        epochs = [e for e, _ in per_seed[seeds[0]]]
        mean = [statistics.fmean(per_seed[s][i][1] for s in seeds) for i in range(len(epochs))]
        ax.plot(epochs, mean, marker='.', label=f'{name} (mean of {len(seeds)} seeds)')
    ax.set_xlabel('epoch')
    ax.set_ylabel('CIFAR-10 test top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=120), overwrite=True)
    plt.close(fig)
    return path


def summarize(results, cfg, args, wall_s):
    seeds = sorted(results)
    base = [results[s]['runs']['base'] for s in seeds]
    sila = [results[s]['runs']['sila'] for s in seeds]
    sets = len(sila[0]['branches'])
    k = sila[0]['topk']
    rows = {'base': [[b['branches'][0][f'top{i}'] for b in base] for i in range(1, k + 1)]}
    for j in range(sets):
        rows[f'Sila ACC{j + 1}'] = [[r['branches'][j][f'top{i}'] for r in sila] for i in range(1, k + 1)]
    rows['Sila ensemble'] = [[r['ensemble'][f'top{i}'] for r in sila] for i in range(1, k + 1)]
    base_acc = [b['branches'][0]['top1'] for b in base]
    deltas = {f'Sila ACC{j + 1} - base ACC1': [r['branches'][j]['top1'] - b0 for r, b0 in zip(sila, base_acc)]
              for j in range(sets)}
    deltas['Sila ensemble - base ACC1'] = [r['ensemble']['top1'] - b0 for r, b0 in zip(sila, base_acc)]
    curves = epoch_curves(args.out, seeds, cfg['model'])
    plateaus = {name: [plateau([dict(epoch=e, v=v) for e, v in per_seed[s]], 'v') for s in seeds]
                for name, per_seed in curves.items()}
    # wall-clock: training time per epoch; the two runs alternate epochs in the same process
    ratio = [r['train_time_s'] / b['train_time_s'] for r, b in zip(sila, base)]
    sizes = sila[0]['branches']
    summary = dict(
        protocol=args.protocol, config=cfg, seeds=seeds, img_size=args.img_size, batch_size=args.batch_size,
        wall_clock_s=None if args.summarize_only else wall_s, device='cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        cpu_count=os.cpu_count(), torch=torch.__version__,
        topk={name: [mean_std(v) for v in vals] for name, vals in rows.items()},
        per_seed_top1={name: vals[0] for name, vals in rows.items()},
        deltas={name: dict(paired_ci(v), per_seed=v) for name, v in deltas.items()},
        plateau_last_fifth=plateaus, git_commit=args.commit,
        epoch_time_s=dict(base=mean_std([b['train_time_per_epoch_s'] for b in base]),
                          sila=mean_std([r['train_time_per_epoch_s'] for r in sila])),
        sila_over_base_time=dict(zip(('mean', 'std'), mean_std(ratio)), per_seed=ratio),
        sizes=[{key: b.get(key) for key in ('branch', 'exit', 'params', 'size_mb', 'cr')} for b in sizes],
        taps=results[seeds[0]]['taps'])

    lines = [f"### {cfg['model']} vs {cfg['model'][5:]} on CIFAR-10, {cfg['epochs']} epochs ({cfg['recipe']} "
             f"schedule), {args.img_size}px, seeds {seeds} (mean ± std)", '',
             '| model / output set | ' + ' | '.join(f'top-{i}' for i in range(1, k + 1)) + ' |',
             '|---|' + '---:|' * k]
    for name, vals in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(fmt(v) for v in vals) + ' |')
    lines += ['', '| paired difference (top-1, points) | mean ± std | 95 % CI (paired t) | significant | per seed |',
              '|---|---:|---:|---|---|']
    for name, v in deltas.items():
        ci = summary['deltas'][name]
        ci_text = '-' if ci['ci95'] is None else f"[{ci['ci95'][0]:+.2f}, {ci['ci95'][1]:+.2f}]"
        sig = '-' if ci['significant'] is None else ('yes' if ci['significant'] else 'no')
        lines.append(f'| {name} | {fmt(v)} | {ci_text} | {sig} | {", ".join(f"{d:+.2f}" for d in v)} |')
    lines += ['', 'Plateau check, last fifth of the epochs (max - min of test top-1, mean over seeds):']
    for name, per_seed in plateaus.items():
        lines.append(f"- {name}: range {statistics.fmean(p['range'] for p in per_seed):.2f} points, slope "
                     f"{statistics.fmean(p['slope_per_epoch'] for p in per_seed):+.3f} points/epoch "
                     f"(epochs {per_seed[0]['epochs'][0]}-{per_seed[0]['epochs'][1]})")
    lines += ['', '| output set | exit | params | MB (fp32) | CR |', '|---|---|---:|---:|---:|']
    for b in sizes:
        lines.append(f"| {b['branch']} | {b['exit']} | {b['params']:,} | {b['size_mb']:.2f} | "
                     f"{100 * b['cr']:.2f} % |")
    eb, es = summary['epoch_time_s']['base'], summary['epoch_time_s']['sila']
    lines += ['', f"Training time per epoch: base {eb[0]:.1f} ± {eb[1]:.1f} s, Sila {es[0]:.1f} ± {es[1]:.1f} s; "
                  f"Sila / base = {fmt(ratio, 3)} (per seed {', '.join(f'{r:.3f}' for r in ratio)})."
                  + ('' if args.summarize_only else f" Whole benchmark: {wall_s / 60:.1f} min wall-clock.")]
    return summary, '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--protocol', choices=['auto', *PROTOCOLS], default='auto',
                   help='auto: gpu when CUDA is available, else cpu')
    p.add_argument('--data-dir', type=Path, default=DEFAULT_DATA)
    p.add_argument('--out', type=Path, default=Path('output/reproduce_cifar10'))
    p.add_argument('--cache', type=Path, default=None, help='decoded-data cache (default: <out>/cifar10_uint8.pt)')
    p.add_argument('--epochs', type=int, default=None, help="override the protocol's epochs")
    p.add_argument('--seeds', type=int, nargs='+', default=None, help="override the protocol's seeds")
    p.add_argument('--jobs', type=int, default=None, help="override the protocol's parallel processes")
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--limit', type=int, default=None, help='images per split (smoke tests only)')
    p.add_argument('--state-dir', type=Path, default=None,
                   help='per-seed resumable training states (default ~/.cache/timm-sila/reproduce/<protocol>): '
                        'an interrupted run continues from its last finished epoch')
    p.add_argument('--device', default=None, help='cpu / cuda (default: cuda when available)')
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: the protocol's; --no-channels-last for NCHW, "
                        "bit for bit what a run in NCHW gave)")
    p.add_argument('--summarize-only', action='store_true', help='rebuild the summary from the seeds\' results')
    args = p.parse_args(argv)
    if args.protocol == 'auto':
        args.protocol = 'gpu' if torch.cuda.is_available() else 'cpu'
    cfg = dict(PROTOCOLS[args.protocol])
    for key in ('epochs', 'seeds', 'jobs'):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if not (args.data_dir / 'train').is_dir() or not (args.data_dir / 'test').is_dir():
        raise SystemExit(f'{args.data_dir} must be an ImageFolder root with train/ and test/ (CIFAR-10 as JPEGs).')
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f'_{args.limit}' if args.limit else ''
    args.cache = args.cache or args.out / f'cifar10_uint8_{args.img_size}{suffix}.pt'
    args.state_dir = args.state_dir or Path.home() / '.cache' / 'timm-sila' / 'reproduce' / f'{args.protocol}{suffix}'
    args.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        args.commit = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True,
                                     text=True).stdout.strip() or None
    except OSError:
        args.commit = None
    print(f'protocol {args.protocol}: {cfg}', flush=True)

    start = time.time()
    if not args.cache.is_file():  # decode the JPEGs once, before the parallel jobs read the cache
        sys.path.insert(0, str(TRAIN.parent))
        import train_cifar
        train_cifar.load_data(args.data_dir, args.img_size, args.limit, args.cache)
        print(f'decoded {args.data_dir} into {args.cache} ({time.time() - start:.0f}s)', flush=True)
    if args.summarize_only:
        results = {s: json.loads((args.out / f'seed{s}' / 'results.json').read_text()) for s in cfg['seeds']
                   if (args.out / f'seed{s}' / 'results.json').is_file()}
    else:
        results = run_seeds(cfg, args, args.out)
    summary, table = summarize(results, cfg, args, time.time() - start)
    png = plot_curves(epoch_curves(args.out, sorted(results), cfg['model']), args.out / 'accuracy.png',
                      f"{cfg['model']} vs {cfg['model'][5:]}, CIFAR-10, {cfg['epochs']} epochs, seeds {sorted(results)}")
    # the summary of each run replaces the last one's, whole (the per-seed stdout.log files are appended to)
    atomic_write_file(args.out / 'summary.json', lambda tmp: tmp.write_text(json.dumps(summary, indent=2)),
                      overwrite=True)
    atomic_write_file(args.out / 'summary.md', lambda tmp: tmp.write_text(table + '\n'), overwrite=True)
    print('\n' + table)
    print(f'\nwritten: {args.out / "summary.json"}, {args.out / "summary.md"}' + (f', {png}' if png else ''))


if __name__ == '__main__':
    main()
