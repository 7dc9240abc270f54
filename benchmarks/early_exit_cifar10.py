"""Early exits on a CIFAR-10 SilaNet trained by examples/train_cifar.py with --val-fraction.

Temperatures and the exit threshold are fitted on the held-out part of train (re-created with the same seed
as the training run); the test split is only measured. Prints the exit curve and the operating point that
loses at most --max-drop accuracy points on the calibration data, with its measured throughput ratio
EarlyExit / base model at the given batch size.

    python benchmarks/reproduce_cifar10.py --protocol small --out runs/small      # trains with --val-fraction 0.1
    python benchmarks/early_exit_cifar10.py --checkpoint runs/small/seed0/sila_checkpoint.pth.tar --val-fraction 0.1
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'examples'))
import train_cifar  # noqa: E402  (the training example's data loading and validation split)

from timm_sila import load_silanet  # noqa: E402
from timm_sila.io.atomic import atomic_write_file, check_output_file  # noqa: E402
from timm_sila.io.checkpoint import read_checkpoint  # noqa: E402
from timm_sila.exits.curve import exit_curve, plot_curve
from timm_sila_cli.exit_curve import format_curve  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', type=Path, required=True)
    p.add_argument('--data-dir', type=Path, default=train_cifar.DEFAULT_DATA)
    p.add_argument('--cache', type=Path, default=None, help='decoded-data cache shared with train_cifar.py')
    p.add_argument('--val-fraction', type=float, required=True, help='as in the training run')
    p.add_argument('--seed', type=int, default=0, help='the training run\'s --seed (fixes its validation split)')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--policy', choices=('confidence', 'entropy'), default='confidence')
    p.add_argument('--max-drop', type=float, default=1.0)
    p.add_argument('--points', type=int, default=16)
    p.add_argument('--timed', type=int, default=5, help='sweep rows whose throughput is measured')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--out', type=Path, default=Path('output/early_exit'))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    for name in ('exit_curve.json', 'exit_curve.png'):  # before the slow part (the writes check again)
        if args.out.is_dir():
            check_output_file(args.out / name, True, [args.checkpoint, args.data_dir])
    ckpt = read_checkpoint(args.checkpoint)
    model = load_silanet(ckpt).eval()
    cfg = ckpt.data_config
    seed = args.seed
    img_size = int(cfg.get('input_size', [3, 32, 32])[-1])
    data = train_cifar.load_data(args.data_dir, img_size, None, args.cache)
    (_, _), (x_val, y_val) = train_cifar.split_validation(*data['train'], args.val_fraction, seed)
    mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
    calib = train_cifar.test_batches(x_val, y_val, mean, std, args.batch_size)
    test = train_cifar.test_batches(*data['test'], mean, std, args.batch_size)
    print(f'{model.arch} SilaNet, taps {model.taps}; calibration: {len(y_val)} held-out train images (seed {seed}); '
          f'evaluation: {len(data["test"][1])} test images; batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads', flush=True)

    result = exit_curve(model, calib, test, policy=args.policy, points=args.points, max_drop=args.max_drop,
                        timed=args.timed, repeats=args.repeats, progress=lambda line: print(line, file=sys.stderr))
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = [args.checkpoint, args.data_dir]  # the reports of each run replace the last one's, never an input
    atomic_write_file(args.out / 'exit_curve.json', lambda tmp: tmp.write_text(json.dumps(result, indent=2)),
                      overwrite=True, sources=inputs)
    png = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        png = atomic_write_file(args.out / 'exit_curve.png', lambda tmp: plot_curve(result, tmp), overwrite=True,
                                sources=inputs)
    print(format_curve(result))
    chosen = next(r for r in result['rows'] if r['chosen'])
    print(f"\nchosen on calibration data (max drop {args.max_drop} points): test accuracy {chosen['accuracy']:.2f} % "
          f"(base {result['base_accuracy']:.2f} %, drop {chosen['drop']:.2f}), compute {chosen['compute']:.3f}, "
          f"measured throughput EarlyExit/base {chosen['speedup']:.2f}x; written to {args.out}"
          + (f' ({png.name})' if png else ''))


if __name__ == '__main__':
    main()
