"""Per-branch evaluation (paper Tables 2-3): top-1..5, loss, branch ensemble, params / MB / CR, in one pass.

Python: `evaluate(model, loader) -> dict`. CLI: `timm-sila eval` (`run_eval`; its parser is in timm_sila_cli).
"""
import argparse
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_sila.model import SilaNet
from .sizes import branch_sizes

__all__ = ['evaluate', 'format_eval', 'resolve_device', 'run_eval']


def _topk_correct(logits: torch.Tensor, target: torch.Tensor, maxk: int) -> torch.Tensor:
    """(maxk,) number of samples whose target is within the top-k predictions, k = 1..maxk."""
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = (pred == target[:, None]).float().cumsum(1).clamp_(max=1)
    return hit.sum(0)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        device: Optional[torch.device] = None,
        topk: int = 5,
        ensemble: bool = True,
        progress: bool = False,
        desc: str = 'eval',
        sizes: bool = True,
) -> Dict[str, Any]:
    """Evaluate every branch of `model` on `loader` ((images, targets) batches) in one pass.

    SilaNet (not stripped): all sets from one backbone pass per batch (`forward_branches`), plus the branch
    ensemble (mean of the sets' softmaxes). Any other model (stripped branch, plain timm model): one row.
    Returns dict(num_samples, topk, branches=[{branch, top1..topK (%), loss, params, size_mb, cr}, ...],
    ensemble={top1..topK, loss} or None). loss is the plain mean cross-entropy of that branch's (B, N) logits;
    the ensemble's loss is the NLL of the mean probability. The model is left in eval mode.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    model.eval()
    multi = isinstance(model, SilaNet) and not model.stripped
    n_seen = 0
    maxk = None
    correct: Optional[torch.Tensor] = None  # (branches [+ ensemble], maxk)
    loss_sum: Optional[torch.Tensor] = None
    batches = loader
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(loader, desc=desc, leave=False, total=len(loader) if hasattr(loader, '__len__') else None)
            batches = bar
        except ImportError:
            pass
    for images, target in batches:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        outs = model.forward_branches(images) if multi else [model(images)]
        outs = [o.float() for o in outs]
        if correct is None:
            num_classes = outs[0].shape[1]
            maxk = min(topk, num_classes)
            rows = len(outs) + (1 if multi and ensemble else 0)
            correct = torch.zeros(rows, maxk, dtype=torch.float64)
            loss_sum = torch.zeros(rows, dtype=torch.float64)
        for i, logits in enumerate(outs):
            correct[i] += _topk_correct(logits, target, maxk).double().cpu()
            loss_sum[i] += F.cross_entropy(logits, target, reduction='sum').double().cpu()
        if multi and ensemble:
            probs = torch.stack([o.softmax(-1) for o in outs]).mean(0)
            correct[-1] += _topk_correct(probs, target, maxk).double().cpu()
            loss_sum[-1] += F.nll_loss(probs.clamp_min(1e-12).log(), target, reduction='sum').double().cpu()
        n_seen += target.shape[0]
    if bar is not None:
        bar.close()
    if not n_seen:
        raise ValueError('evaluate() got an empty loader: no (images, targets) batch to evaluate.')

    def row(i):
        acc = (100.0 * correct[i] / n_seen).tolist()
        out = {f'top{k + 1}': acc[k] for k in range(maxk)}
        out['loss'] = float(loss_sum[i] / n_seen)
        return out

    size_rows = branch_sizes(model) if sizes else None
    branches = []
    n_branches = len(correct) - (1 if multi and ensemble else 0)
    for i in range(n_branches):
        entry = dict(branch=i if multi else getattr(model, 'branch', 0) if isinstance(model, SilaNet) else 0)
        entry.update(row(i))
        if size_rows is not None:
            entry.update({k: v for k, v in size_rows[i].items() if k != 'branch'})
        branches.append(entry)
    return dict(num_samples=n_seen, topk=maxk, branches=branches,
                ensemble=row(len(correct) - 1) if multi and ensemble else None)


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


# --- CLI: timm-sila eval (parser: timm_sila_cli) ------------------------------------------------------------
def resolve_device(name: Optional[str]) -> torch.device:
    """The torch device for CLI --device (default: cuda when available, else cpu); ValueError, naming it, when
    torch does not know it or this machine does not have it."""
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
        if device.type == 'meta':
            raise ValueError('it holds no data')
        torch.empty(1, device=device)
    except Exception as e:  # torch raises RuntimeError / AssertionError / ValueError, depending on the build
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f'--device {name!r} cannot be used here ({reason}); pass e.g. --device cpu or '
                         f'--device cuda:0.') from None
    return device


def _load_stripped_folder(args: argparse.Namespace) -> nn.Module:
    """--model local-dir:DIR, a folder written by `timm-sila strip`."""
    from timm_sila.ship.strip import load_stripped
    name = args.model
    if args.checkpoint:
        raise ValueError(f'--checkpoint does not apply to {name}: the folder holds its own weights.')
    if args.ema:
        raise ValueError('--ema does not apply to a stripped folder (it holds one set of weights).')
    if args.num_classes is not None:
        raise ValueError('--num-classes does not apply to a stripped folder: its config.json says.')
    return load_stripped(name[len('local-dir:'):])  # reads config.json as a stranger's file, names it on errors


def _load_model(args: argparse.Namespace):
    """(model, checked data-config args from the checkpoint) for the CLI arguments. Both a SilaNet and a plain timm
    checkpoint are checked against their weights before the model is built and loaded strictly
    (`checkpoint.build_checked`): integer tensors are refused, never cast."""
    from timm_sila.io.checkpoint import build_checked, load_silanet, read_checkpoint
    from timm_sila.cli import check_model_name
    from timm_sila.config import is_sila_name, sanitize_file_data_config
    name = args.model
    if name.startswith('local-dir:'):
        return _load_stripped_folder(args), {}
    check_model_name(name)
    if not args.checkpoint:
        raise ValueError(f'--model {name} needs --checkpoint CKPT (or use --model local-dir:DIR for a stripped '
                         f'folder).')
    ckpt = read_checkpoint(args.checkpoint, ['num_classes'] if args.num_classes is not None else [])
    data_args = sanitize_file_data_config(ckpt.data_config, source=args.checkpoint)
    is_sila = is_sila_name(name) or (
        any(k.startswith('heads.') for k in ckpt.state_dict) and any(k.startswith('base.') for k in ckpt.state_dict))
    if is_sila:
        model = load_silanet(ckpt, model=name, num_classes=args.num_classes, ema=args.ema, img_size=args.img_size)
        return model, data_args
    state_dict = ckpt.weights(args.ema)
    kwargs, origins = dict(ckpt.model_kwargs), dict(ckpt.origins)
    if args.num_classes is not None:
        kwargs['num_classes'], origins['num_classes'] = args.num_classes, '--num-classes'
    img_size = args.img_size
    if img_size is not None:
        kwargs.pop('img_size', None)  # the explicit size wins over the file's model_kwargs
    elif 'img_size' not in kwargs:
        img_size = ckpt.img_size
    model = build_checked(name.split('.', 1)[0], kwargs, state_dict, args.checkpoint, img_size=img_size,
                          origins=origins, hint='Pass the right --model / --num-classes.')
    return model.eval(), data_args


def _model_channels(model: nn.Module) -> Optional[int]:
    channels = getattr(model, 'in_chans', None)
    return channels if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0 else None


def _data_config(model: nn.Module, data_args: Dict[str, Any], img_size: Optional[int]) -> Dict[str, Any]:
    """The eval data config, resolved from the checkpoint's (checked) train.py data args exactly as train.py
    resolves its validation transform: `timm.data.resolve_data_config(args, model=model)`, where an empty or None
    value (train.py's defaults: interpolation='', mean=None, ...) means the model's own. `img_size` (CLI
    --img-size) replaces a stored input size.

    Channels are the model's input channels (`model.in_chans`; timm's pretrained cfg says 3 even for a model built
    with in_chans=1): a stored input size of another channel count is a ValueError; mean / std of another length
    are averaged to one value per channel with a warning, as timm's train.py loader does (`adapt_to_chs`)."""
    from timm.data import resolve_data_config
    args = dict(data_args)
    channels = _model_channels(model)
    if img_size is not None:
        args.update(input_size=None, img_size=int(img_size))
    elif isinstance(args.get('img_size'), (list, tuple)):  # (H, W): timm reads only an int img_size
        args['input_size'] = args.get('input_size') or (args.get('in_chans') or channels or 3, *args['img_size'])
    stored = (args.get('input_size') or (None,))[0] or args.get('in_chans')
    if channels is not None and stored is not None and stored != channels:
        raise ValueError(f'the data config gives {stored}-channel input (input_size / in_chans) but the model takes '
                         f'{channels} input channels; the file does not describe this model.')
    if channels is not None and stored is None:
        args['in_chans'] = channels
    try:
        cfg = resolve_data_config(args, model=model)
    except AssertionError:  # timm asserts that mean / std have one value or one per input channel
        raise ValueError(f'the data config {args} is inconsistent: mean and std need one value or one per input '
                         f'channel.') from None
    if channels is not None and cfg['input_size'][0] != channels:  # the size came from the model's pretrained cfg
        cfg['input_size'] = (channels, *cfg['input_size'][1:])
    chans = cfg['input_size'][0]
    for key in ('mean', 'std'):
        values = tuple(cfg[key])
        if len(values) != chans:
            cfg[key] = (sum(values) / len(values),) * chans
            warnings.warn(f'the model takes {chans} input channel{"s" if chans > 1 else ""} but its {key} has '
                          f'{len(values)} values: using their average {cfg[key][0]:.4g} for each, as timm\'s '
                          f'train.py does.', UserWarning, stacklevel=2)
    return cfg


def _class_names(args: argparse.Namespace, model: nn.Module) -> Optional[List[str]]:
    """The class names a stripped folder's config.json records (timm's `label_names`), if usable; else None."""
    if not args.model.startswith('local-dir:'):
        return None  # checkpoints (timm train.py's included) record no class names
    from timm_sila.data.folder import class_names_from_config
    from .metrics import read_json_file
    from timm_sila.ship.strip import CONFIG_NAME
    config = read_json_file(Path(args.model[len('local-dir:'):]) / CONFIG_NAME, 'Config file', max_bytes=16 << 20)
    return class_names_from_config(config, getattr(model, 'num_classes', None))


def run_eval(args: argparse.Namespace) -> int:
    """`timm-sila eval`: prints the per-branch table (or JSON); returns the exit status."""
    from timm_sila.cli import print_json
    from timm_sila.data.folder import eval_loader
    from .sizes import MemoryBoundError
    root = Path(args.data_dir) / args.split
    if not root.is_dir():
        raise FileNotFoundError(f'{root} does not exist: --data-dir must hold the split folder {args.split!r} '
                                f'(ImageFolder layout DIR/{args.split}/<class>/<image>).')
    device = resolve_device(args.device)
    model, data_args = _load_model(args)
    cfg = _data_config(model, data_args, args.img_size)
    model.to(device)  # before the memory check: the weights take their share
    try:
        loader = eval_loader(root, model, cfg, args.batch_size, workers=args.workers, device=device,
                             class_names=_class_names(args, model))
    except MemoryBoundError as e:
        raise ValueError(e.message('--batch-size', '--img-size')) from e
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
