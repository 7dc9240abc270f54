"""Training throughput on the CPU per setting, base and Sila side by side: what makes a CPU training step faster.

One training step = examples/train_cifar.py's step: augment + normalise a uint8 batch, forward, loss (Sila loss for
the SilaNet, cross-entropy for the base), backward, SGD step. For each setting the base and the SilaNet alternate
in rounds inside one run; the figure is the median step time after warm-up, printed as images/s and as a ratio to
the first setting ('1 process x 1 thread'). 'N processes' runs N copies at once and counts their images together:
the throughput a multi-seed protocol gets from the machine.

    python benchmarks/cpu_train_speed.py                          # test_resnet and resnet18, 32 px, batch 128
    python benchmarks/cpu_train_speed.py --models test_resnet --steps 20
"""
import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'examples'))

SETTINGS = {
    '1 process x 1 thread': dict(procs=1, threads=1),
    '1 process x 2 threads': dict(procs=1, threads=2),
    '2 processes x 1 thread': dict(procs=2, threads=1),
    '2 processes x 1 thread, channels_last': dict(procs=2, threads=1, channels_last=True),
    '1 process x 2 threads, channels_last': dict(procs=1, threads=2, channels_last=True),
    '1 process x 2 threads, bf16 autocast': dict(procs=1, threads=2, bf16=True),
    '1 process x 2 threads, torch.compile': dict(procs=1, threads=2, compile=True),
}


def _worker(arch, setting, steps, warmup, batch, img, queue):
    """Step times (s) of base and Sila, alternating, in this process."""
    import timm
    import timm_sila
    from train_cifar import augment, normalize
    torch.set_num_threads(setting['threads'])
    torch.manual_seed(0)
    sila = timm.create_model(f'sila_{arch}', num_classes=10)
    base = timm.create_model(arch, num_classes=10)
    runs = {'base': (base, nn.CrossEntropyLoss()), 'sila': (sila, timm_sila.SilaLoss(10))}
    steps_of = {}
    for name, (model, crit) in runs.items():
        model.train()
        if setting.get('channels_last'):
            model.to(memory_format=torch.channels_last)
        fwd = torch.compile(model) if setting.get('compile') else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps_of[name] = (fwd, crit, opt)
    x = torch.randint(0, 256, (1024, 3, img, img), dtype=torch.uint8)
    y = torch.randint(0, 10, (1024,))
    mean = torch.full((1, 3, 1, 1), 0.5)
    gen = torch.Generator().manual_seed(0)
    times = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (fwd, crit, opt) in steps_of.items():
            idx = torch.randint(0, 1024, (batch,), generator=gen)
            t = time.perf_counter()
            images = normalize(augment(x[idx], gen), mean, mean)
            if setting.get('channels_last'):
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bool(setting.get('bf16'))):
                loss = crit(fwd(images), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    queue.put({name: statistics.median(v) for name, v in times.items()})


def measure(arch, setting, steps, warmup, batch, img):
    """{'base': images/s, 'sila': images/s} over all processes of the setting."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(arch, setting, steps, warmup, batch, img, queue))
             for _ in range(setting['procs'])]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {name: sum(batch / r[name] for r in results) for name in ('base', 'sila')}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['test_resnet', 'resnet18'])
    p.add_argument('--settings', nargs='+', default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument('--steps', type=int, default=12, help='timed steps per model and process')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--img-size', type=int, default=32)
    args = p.parse_args(argv)
    print(f'torch {torch.__version__}, {mp.cpu_count()} CPUs; batch {args.batch_size}, {args.img_size} px; '
          f'{args.steps} timed steps after {args.warmup} warm-up, medians', flush=True)
    print('| model | setting | base img/s | Sila img/s | Sila / base time | base vs first setting |')
    print('|---|---|---:|---:|---:|---:|')
    for arch in args.models:
        first = None
        for name in args.settings:
            r = measure(arch, SETTINGS[name], args.steps, args.warmup, args.batch_size, args.img_size)
            first = first or r['base']
            print(f"| {arch} | {name} | {r['base']:.0f} | {r['sila']:.0f} | {r['base'] / r['sila']:.3f} | "
                  f"{r['base'] / first:.2f}x |", flush=True)


if __name__ == '__main__':
    main()
