"""`timm-sila eval`: per-branch top-1..5, loss, ensemble and params / MB / CR on an ImageFolder split."""
import argparse
from pathlib import Path
from typing import Any, Dict

from timm_sila.data.config import resolve_data_config
from timm_sila.data.folder import eval_loader
from timm_sila.measure.evaluate import evaluate
from timm_sila.ship.load import LOCAL_DIR

from ._common import model_from_args, print_json, resolve_device


def format_eval(result: Dict[str, Any]) -> str:
    """Human-readable table of an `evaluate` result."""
    k = result['topk']
    head = ['branch', 'exit'] + [f'top{i}' for i in range(1, k + 1)] + ['loss', 'params', 'MB', 'CR']
    lines = []
    for b in result['branches']:
        lines.append([str(b['branch']), str(b.get('exit', ''))]
                     + [f"{b[f'top{i}']:.2f}" for i in range(1, k + 1)] + [f"{b['loss']:.4f}"]
                     + [f"{b['params']:,}" if b.get('params') is not None else '-',
                        f"{b['size_mb']:.2f}" if b.get('size_mb') is not None else '-',
                        f"{100 * b['cr']:.2f}%" if b.get('cr') is not None else '-'])
    if result.get('ensemble'):
        e = result['ensemble']
        lines.append(['ens', 'mean softmax'] + [f"{e[f'top{i}']:.2f}" for i in range(1, k + 1)]
                     + [f"{e['loss']:.4f}", '-', '-', '-'])
    widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(head)]
    fmt = lambda r: '  '.join(c.rjust(w) if j >= 2 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(head), fmt(['-' * w for w in widths])] + [fmt(r) for r in lines]
    out.append(f"{result['num_samples']} images; accuracy in %, loss = mean cross-entropy; "
               f"CR = 1 - params/params(branch 0); MB = fp32 params / 2**20")
    return '\n'.join(out)


def run(args: argparse.Namespace) -> int:
    """Evaluates every branch on --data-dir/--split in one pass; prints the table (or the JSON result)."""
    root = Path(args.data_dir) / args.split
    if not root.is_dir():
        raise FileNotFoundError(f'{root} does not exist: --data-dir must hold the split folder {args.split!r} '
                                f'(ImageFolder layout DIR/{args.split}/<class>/<image>).')
    device = resolve_device(args.device)
    model, data_args = model_from_args(args)
    cfg = resolve_data_config(model, data_args, args.img_size)
    model.to(device)  # before the memory check: the weights take their share
    names = model.pretrained_cfg.get('label_names') if args.model.startswith(LOCAL_DIR) else None  # a folder's own
    loader = eval_loader(root, model, cfg, args.batch_size, workers=args.workers, device=device, class_names=names)
    result = evaluate(model, loader, device=device, progress=not args.no_progress and not args.json,
                      desc=f'eval {args.split}')
    result.update(model=args.model, checkpoint=args.checkpoint, ema=bool(args.ema), split=args.split,
                  data_dir=str(args.data_dir), data_config={k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in cfg.items()})
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}{' (EMA)' if args.ema else ''} on {root}  input {tuple(cfg['input_size'])}")
        print(format_eval(result))
    return 0
