"""Train a sila_* model - and with --also-base its plain base model under the identical recipe - on an ImageFolder.

Read top to bottom: (1) data, loaded into memory once as uint8 tensors, (2) augmentation on tensors,
(3) the recipe (paper's SGD + MultiStep schedule, or the same schedule scaled to --epochs), (4) the models,
(5) the epoch loop (Sila loss for the SilaNet, plain cross-entropy for the base), (6) logs (CSV, JSON, PNG),
(7) the final checkpoint (the format `timm-sila strip` reads) and the stripped branch-0 / branch-1 folders.

    python examples/train_cifar.py --data-dir ../shared/data/cifar10 --model sila_resnet18 --also-base --epochs 10
    python examples/train_cifar.py --recipe paper      # 260 epochs, milestones [30, 55, ..., 240]

Identical recipe: both models start from the same weights where they share them (the base is initialised
with the SilaNet's `base.*` weights), see the same batches in the same order with the same random crops and
flips (each run draws from its own generator seeded with --seed), use the same optimizer and schedule.
The test split is only reported, never used to choose anything; --val-fraction carves a validation split
out of train for tuning.
"""
import argparse
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_sila
from timm_sila.io.atomic import atomic_write_file
from timm_sila.measure.evaluate import evaluate
from timm_sila_cli.eval import format_eval

PAPER_MILESTONES = [30, 55, 80, 105, 135, 160, 180, 200, 220, 240]
PAPER_EPOCHS = 260
# Paper Table 1: (beta, lambda) per architecture, CIFAR-10 / CIFAR-100; others use (0.1, 0.5).
PAPER_BETA_DECAY = {
    ('vgg19_bn', 10): (0.05, 0.8), ('vgg19_bn', 100): (0.3, 0.5),
    ('mobilenetv1_100', 10): (0.2, 0.5), ('mobilenetv1_100', 100): (0.2, 0.5),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10'


# --- (1) data: decode every image once into a uint8 tensor --------------------------------------------------------
def load_image_folder(root: Path, img_size: int, limit: Optional[int] = None, seed: int = 0):
    """An ImageFolder split as (uint8 images (N, 3, S, S), int64 labels (N,), class names), decoded once.

    `limit` keeps a seeded random subset of at most that many images.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(root))
    samples = folder.samples
    if limit is not None and limit < len(samples):
        keep = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        samples = [samples[int(i)] for i in keep]
    images = torch.empty(len(samples), 3, img_size, img_size, dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as img:
            img = img.convert('RGB')
            if img.size != (img_size, img_size):
                img = img.resize((img_size, img_size), Image.BILINEAR)
            images[i] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(
                img_size, img_size, 3).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels, folder.classes


def load_data(data_dir: Path, img_size: int, limit: Optional[int], cache: Optional[Path]) -> Dict:
    """{'train': (x, y), 'test': (x, y), 'classes': [...]} from data_dir/{train,test}; cached with --cache."""
    key = dict(root=str(Path(data_dir).resolve()), img_size=img_size, limit=limit)
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
        if data.get('key') == key:
            return data
    data = {'key': key}
    for split in ('train', 'test'):
        x, y, classes = load_image_folder(data_dir / split, img_size, limit)
        data[split] = (x, y)
    data['classes'] = classes
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(cache, lambda tmp: torch.save(data, tmp), overwrite=True)  # a cache: refreshed at will
    return data


def split_validation(x, y, fraction: float, seed: int):
    """Carve a seeded random validation split out of train (for tuning; the test split is never used for it)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 12345))
    n_val = int(round(fraction * len(y)))
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


# --- (2) augmentation and normalisation on tensors ----------------------------------------------------------------
def augment(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding + random horizontal flip, per image, drawn from `gen` (uint8 in/out)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)).to(x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255) - mean) / std


def test_batches(x, y, mean, std, batch_size: int = 500):
    """A re-iterable loader of normalised (images, labels) batches for timm_sila.evaluate."""
    class Batches:
        def __len__(self):
            return math.ceil(len(y) / batch_size)

        def __iter__(self):
            for i in range(0, len(y), batch_size):
                yield normalize(x[i:i + batch_size], mean, std), y[i:i + batch_size]
    return Batches()


# --- (3) the recipe -----------------------------------------------------------------------------------------------
def milestones_for(recipe: str, epochs: int) -> List[float]:
    """Paper milestones, or the same ones scaled to `epochs` (fractional epochs: the lr drops mid-epoch)."""
    if recipe == 'paper':
        return [float(m) for m in PAPER_MILESTONES]
    return [m * epochs / PAPER_EPOCHS for m in PAPER_MILESTONES]


def lr_at(epoch_progress: float, lr: float, milestones: List[float], gamma: float) -> float:
    """MultiStep: lr * gamma ** (number of milestones already passed)."""
    return lr * gamma ** sum(epoch_progress >= m for m in milestones)


# --- (4) the models -----------------------------------------------------------------------------------------------
class Run:
    """One model being trained: the model, its loss, optimizer and its own (seeded) data generator."""

    def __init__(self, name: str, model: nn.Module, criterion: nn.Module, args):
        self.name = name
        self.model = model
        self.criterion = criterion
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay, nesterov=args.nesterov)
        self.gen = torch.Generator().manual_seed(args.seed)  # same seed for every run: same batches, same crops
        self.train_time = 0.0
        self.rows: List[Dict] = []


def build_runs(args, num_classes: int) -> List[Run]:
    torch.manual_seed(args.seed)
    sila = timm.create_model(args.model, num_classes=num_classes, sila_beta=args.beta, sila_decay=args.decay,
                             sila_sets=args.sets, **args.model_kwargs)
    runs = [Run('sila', sila, timm_sila.SilaLoss(num_classes, beta=sila.beta, decay=sila.decay), args)]
    if args.also_base:
        base = timm.create_model(sila.arch, num_classes=num_classes, **args.model_kwargs)
        base.load_state_dict(sila.base.state_dict())  # identical initial weights where shared
        runs.append(Run('base', base, nn.CrossEntropyLoss(), args))
    return runs


# --- (5) one epoch ------------------------------------------------------------------------------------------------
def train_one_epoch(run: Run, x, y, mean, std, epoch: int, args, milestones) -> float:
    """One pass over the training set in a `run.gen`-seeded order; returns the mean training loss."""
    model = run.model.train()
    order = torch.randperm(len(y), generator=run.gen)
    steps = len(order) // args.batch_size  # drop the last partial batch (BatchNorm-friendly)
    total, seen = 0.0, 0
    bar = range(steps)
    if args.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f'{run.name} epoch {epoch + 1}/{args.epochs}', leave=False)
        except ImportError:
            pass
    start = time.time()
    for step in bar:
        lr = lr_at(epoch + step / steps, args.lr, milestones, args.gamma)
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        images = normalize(augment(x[idx.to(x.device)], run.gen), mean, std)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = run.criterion(model(images), y[idx.to(y.device)])  # SilaNet: (B, M*N) SilaLogits, one softmax
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        if args.progress and hasattr(bar, 'set_postfix'):
            bar.set_postfix(loss=f'{total / seen:.3f}', lr=f'{lr:.4f}')
    run.train_time += time.time() - start
    return total / max(seen, 1)


def accuracies(result: Dict) -> Dict[str, float]:
    """ACC1, ACC2, ... (top-1 of set 0, 1, ...) as in the paper's Table 1, plus the ensemble."""
    accs = {f'ACC{b["branch"] + 1}': b['top1'] for b in result['branches']}
    if result.get('ensemble'):
        accs['ENS'] = result['ensemble']['top1']
    return accs


# --- (6) logs -----------------------------------------------------------------------------------------------------
def _logged_path(path, out: Path) -> str:
    """A path as the logs record it: relative to the output folder when inside it, else only its name (logs travel
    with the results; absolute paths of the machine that wrote them mean nothing elsewhere)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(out.resolve())) or '.'
    except ValueError:
        return path.name


def write_logs(out: Path, runs: List[Run], meta: Dict) -> None:
    rows = [dict(run=r.name, **row) for r in runs for row in r.rows]
    fields = list(dict.fromkeys(k for row in rows for k in row))

    def csv_log(tmp: Path) -> None:
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    # rewritten every epoch, whole or the previous log: a full disk never leaves half a file
    atomic_write_file(out / 'log.csv', csv_log, overwrite=True)
    write_json(out / 'log.json', dict(meta, epochs=rows))


def write_json(path: Path, obj: Dict) -> None:
    """The run's own JSON (log, results): replaced by each run writing to the same --out."""
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)), overwrite=True)


def plot_curves(out: Path, runs: List[Run], title: str) -> Optional[Path]:
    """accuracy.png: test top-1 per epoch for every branch (paper Figure 3 analog); needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        keys = [k for k in run.rows[0] if k.startswith('ACC')] if run.rows else []
        for key in keys:
            label = f'{run.name} {key}' if run.name == 'sila' else f'{run.name} (plain CE)'
            ax.plot([r['epoch'] for r in run.rows], [r[key] for r in run.rows], marker='.', label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_file(out / 'accuracy.png', lambda tmp: fig.savefig(tmp, dpi=120), overwrite=True)
    plt.close(fig)
    return out / 'accuracy.png'


# --- (7) checkpoint (what `timm-sila strip` reads) ----------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, arch: str, args, num_classes: int, mean, std, epoch: int,
                    model_kwargs: Dict) -> None:
    """A timm train.py-style checkpoint: state_dict, arch, args (model, num_classes, model_kwargs, data config)."""
    ckpt_args = dict(
        model=arch, num_classes=num_classes, model_kwargs=model_kwargs, img_size=args.img_size,
        input_size=[3, args.img_size, args.img_size], mean=[float(m) for m in mean.flatten()],
        std=[float(s) for s in std.flatten()], crop_pct=1.0, interpolation='bilinear',
        seed=args.seed, epochs=args.epochs, lr=args.lr, recipe=args.recipe)
    atomic_write_file(path, lambda tmp: torch.save(dict(epoch=epoch, arch=arch, state_dict=model.state_dict(),
                                                        args=ckpt_args), tmp), overwrite=True)


# --- resumable state: everything an interrupted run needs to continue bit for bit -----------------------------------
def state_key(args, num_classes: int) -> Dict:
    """What must match for a saved state to be continued (epochs only matter when the schedule depends on them)."""
    keys = ('model', 'model_kwargs', 'also_base', 'img_size', 'limit', 'val_fraction', 'recipe', 'batch_size', 'lr',
            'momentum', 'nesterov', 'weight_decay', 'gamma', 'sets', 'beta', 'decay', 'seed', 'channels_last', 'bf16')
    key = {k: getattr(args, k) for k in keys}
    key.update(num_classes=num_classes, data=str(args.data_dir))
    if args.recipe != 'paper':
        key['epochs'] = args.epochs
    return key


def save_state(path: Path, runs: List[Run], epoch: int, key: Dict) -> None:
    """After `epoch` epochs: weights, optimizer, data generator, logs of every run (replaced whole)."""
    state = dict(key=key, epoch=epoch, runs=[dict(
        name=r.name, model=r.model.state_dict(), optimizer=r.optimizer.state_dict(), gen=r.gen.get_state(),
        rows=r.rows, train_time=r.train_time) for r in runs])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: torch.save(state, tmp), overwrite=True)


def load_state(path: Path, runs: List[Run], key: Dict, device) -> int:
    """Restore a state saved by `save_state` with the same key; returns the epochs already done (0: none)."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get('key') != key:
        raise SystemExit(f'{path} holds a run with other settings ({state.get("key")}); '
                         f'pass another --state file or delete it.')
    for run, saved in zip(runs, state['runs']):
        run.model.load_state_dict(saved['model'])
        run.optimizer.load_state_dict(saved['optimizer'])
        run.gen.set_state(saved['gen'].cpu())
        run.rows, run.train_time = saved['rows'], saved['train_time']
    return int(state['epoch'])


def _is_inside(path: Path, folder: Path) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', type=Path, default=DEFAULT_DATA, help='ImageFolder root with train/ and test/')
    p.add_argument('--model', default='sila_resnet18', help='a sila_<arch> name')
    p.add_argument('--model-kwargs', type=json.loads, default={}, help='extra create_model kwargs as JSON')
    p.add_argument('--also-base', action='store_true', help='also train the plain base model, identical recipe')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--limit', type=int, default=None, help='use at most this many images per split')
    p.add_argument('--val-fraction', type=float, default=0.0,
                   help='hold out this fraction of train as a validation split (reported as VAL*)')
    p.add_argument('--cache', type=Path, default=None, help='cache the decoded uint8 tensors in this .pt file')
    p.add_argument('--recipe', choices=('paper', 'scaled'), default='scaled',
                   help="'paper': 260 epochs, milestones [30, ..., 240]; 'scaled': the same milestones scaled "
                        "to --epochs")
    p.add_argument('--epochs', type=int, default=None, help='epochs (default 260 with --recipe paper, else 10)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--nesterov', action='store_true')
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--gamma', type=float, default=0.5, help='lr factor at each milestone (paper: not stated)')
    p.add_argument('--sets', type=int, default=3, help='output sets M')
    p.add_argument('--beta', type=float, default=None, help='beta (default: paper Table 1, else 0.1)')
    p.add_argument('--decay', type=float, default=None, help='lambda (default: paper Table 1, else 0.5)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--device', default=None, help='cuda / cpu (default: cuda when available)')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format (model and inputs)')
    p.add_argument('--bf16', action='store_true', help='bfloat16 autocast for the training forward/loss')
    p.add_argument('--state', type=Path, default=None,
                   help='per-epoch resumable state file (keep it outside the repo): an interrupted run continues '
                        'from its last finished epoch; with --recipe paper also a run extended with more --epochs')
    p.add_argument('--out', type=Path, default=Path('output/train_cifar'))
    p.add_argument('--no-strip', action='store_true', help='do not write the stripped branch folders')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no per-epoch progress bar')
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = PAPER_EPOCHS if args.recipe == 'paper' else 10
    if args.epochs < 1 or args.batch_size < 1 or not 0.0 <= args.val_fraction < 1.0:
        p.error('--epochs and --batch-size must be >= 1 and --val-fraction in [0, 1).')
    if not args.model.startswith('sila_'):
        p.error(f'--model must be a sila_<arch> name (e.g. sila_resnet18), got {args.model!r}; '
                f'--also-base trains the plain <arch> beside it.')
    return args


def main(argv=None, data: Optional[Dict] = None) -> Dict:
    """Train; returns the final results. `data` ({'train': (x, y), 'test': (x, y), 'classes'}, uint8 images)
    replaces --data-dir (used by examples/demo.py and the tests)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    out = args.out
    if data is None and _is_inside(out, args.data_dir):
        raise SystemExit(f'--out {out} lies in --data-dir {args.data_dir}: its files would join the data set. '
                         f'Choose an --out outside it.')
    out.mkdir(parents=True, exist_ok=True)

    # (1) data
    t0 = time.time()
    if data is None:
        if not (args.data_dir / 'train').is_dir():
            raise SystemExit(f'{args.data_dir}/train not found: pass --data-dir, an ImageFolder root with '
                             f'train/ and test/ sub-folders.')
        data = load_data(args.data_dir, args.img_size, args.limit, args.cache)
        source = str(args.data_dir)
    else:
        source = 'in-memory data'
    (x_train, y_train), (x_test, y_test) = data['train'], data['test']
    num_classes = len(data['classes'])
    val = None
    if args.val_fraction > 0:
        (x_train, y_train), val = split_validation(x_train, y_train, args.val_fraction, args.seed)
    mean = x_train.float().mean((0, 2, 3)).div(255).view(1, 3, 1, 1)
    std = x_train.float().std((0, 2, 3)).div(255).view(1, 3, 1, 1)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    mean, std = mean.to(device), std.to(device)
    print(f'data: {len(y_train)} train / {len(y_test)} test images, {num_classes} classes, {args.img_size}px, '
          f'from {source} ({time.time() - t0:.1f}s)', flush=True)

    # (3)+(4) recipe and models
    arch = timm_sila.config.base_arch(args.model)
    paper_bd = PAPER_BETA_DECAY.get((arch, num_classes), (0.1, 0.5))
    args.beta = paper_bd[0] if args.beta is None else args.beta
    args.decay = paper_bd[1] if args.decay is None else args.decay
    milestones = milestones_for(args.recipe, args.epochs)
    runs = build_runs(args, num_classes)
    for run in runs:
        run.model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    sila = runs[0].model
    print(f'{args.model}: taps {sila.taps} (set 1 = deepest), beta {sila.beta}, lambda {sila.decay}; '
          f'SGD lr {args.lr} momentum {args.momentum} wd {args.weight_decay}, {args.epochs} epochs, '
          f'milestones {[round(m, 2) for m in milestones]} x{args.gamma}; seed {args.seed}; '
          f'runs: {[r.name for r in runs]}', flush=True)

    # (5) epochs: the runs alternate epoch by epoch, so machine load affects them alike
    test_loader = test_batches(x_test, y_test, mean, std)
    val_loader = test_batches(*val, mean, std) if val is not None else None
    start = time.time()
    key = state_key(args, num_classes)
    done = load_state(args.state, runs, key, device) if args.state else 0
    if done:
        print(f'resumed from {args.state}: {done} epoch(s) done', flush=True)
    meta = dict(model=args.model, arch=arch, num_classes=num_classes, source=_logged_path(source, out),
                seed=args.seed, args={k: _logged_path(v, out) if isinstance(v, Path) else v
                                      for k, v in vars(args).items()},
                milestones=milestones, taps=list(sila.taps), device=str(device), threads=torch.get_num_threads())
    for epoch in range(done, args.epochs):
        for run in runs:
            t_epoch = time.time()
            loss = train_one_epoch(run, x_train, y_train, mean, std, epoch, args, milestones)
            train_s = time.time() - t_epoch
            result = evaluate(run.model, test_loader, device=device, sizes=False)
            row = dict(epoch=epoch + 1, lr=lr_at(epoch + 1 - 1e-9, args.lr, milestones, args.gamma),
                       train_loss=round(loss, 5), **{k: round(v, 2) for k, v in accuracies(result).items()})
            if val_loader is not None:
                vres = evaluate(run.model, val_loader, device=device, sizes=False)
                row.update({f'VAL{k[3:]}' if k.startswith('ACC') else f'VAL_{k}': round(v, 2)
                            for k, v in accuracies(vres).items()})
            row.update(train_time_s=round(train_s, 2), epoch_time_s=round(time.time() - t_epoch, 2),
                       elapsed_s=round(time.time() - start, 1))
            run.rows.append(row)
            accs = '  '.join(f'{k} {v:5.2f}' for k, v in accuracies(result).items())
            print(f'[{run.name}] epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  {accs}  '
                  f'({train_s:.0f}s train, {time.time() - start:.0f}s total)', flush=True)
        write_logs(out, runs, meta)  # rewritten every epoch: a killed run keeps its log
        if args.state:
            save_state(args.state, runs, epoch + 1, key)
    png = plot_curves(out, runs, f'{args.model} on {Path(source).name}')

    # (7) final evaluation, checkpoints, stripped branches
    final = dict(meta, runs={})
    for run in runs:
        result = evaluate(run.model, test_loader, device=device)
        result['train_time_s'] = run.train_time
        result['train_time_per_epoch_s'] = run.train_time / args.epochs
        final['runs'][run.name] = result
        print(f'\n{run.name}: final test evaluation')
        print(format_eval(result))
        is_sila = run.name == 'sila'
        ckpt = out / f'{run.name}_checkpoint.pth.tar'
        kwargs = dict(args.model_kwargs, **(sila.sila_args() if is_sila else {}))
        if is_sila:
            kwargs.update(sila_branch=0, sila_stripped=False)
        save_checkpoint(ckpt, run.model, args.model if is_sila else arch, args, num_classes, mean.cpu(),
                        std.cpu(), args.epochs, kwargs)
        final['runs'][run.name]['checkpoint'] = _logged_path(ckpt, out)
    if not args.no_strip:
        for branch in (0, 1):
            folder = timm_sila.strip(out / 'sila_checkpoint.pth.tar', branch=branch, out_dir=out / f'branch{branch}',
                                     overwrite=True)
            final[f'branch{branch}_dir'] = _logged_path(folder, out)
            print(f'stripped branch {branch} -> {folder}')
    write_json(out / 'results.json', final)
    print(f'logs: {out / "log.csv"}, {out / "log.json"}, {png or "(no PNG: pip install matplotlib)"}; '
          f'results: {out / "results.json"}')
    return final


if __name__ == '__main__':
    main()
