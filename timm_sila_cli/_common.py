"""What the command handlers share: the JSON result, model-name and device checks, checkpoint options, opening the
model of `eval` / `exit-curve`. Imported only by handlers (it imports torch and timm)."""
import argparse
import difflib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import timm

from timm_sila.config import sila_name
from timm_sila.ship.load import LOCAL_DIR, load_model

__all__ = ['print_json', 'check_model_name', 'resolve_device', 'checkpoint_options', 'model_from_args']


def print_json(obj: Any) -> None:
    """The command's result: the only text a `--json` run writes to stdout."""
    print(json.dumps(obj, indent=2))


def check_model_name(name: str) -> None:
    """ValueError naming `name` as typed unless timm knows it, or its sila_ form (a pretrained tag is ignored)."""
    arch = name.split('.', 1)[0]
    if timm.is_model(arch) or timm.is_model(sila_name(arch)):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise ValueError(f'unknown model {name!r}: {hint}see timm.list_models() for the names timm knows.')


def resolve_device(name: Optional[str]) -> torch.device:
    """The torch device for --device (default: cuda when available, else cpu); ValueError, naming it, when torch does
    not know it or this machine does not have it."""
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


def checkpoint_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The checkpoint-loading options of `export` and `bench` (--model --num-classes --sets --taps --head --ema
    --model-kwargs) as `load_silanet` takes them; refused for a folder source, which says what it holds."""
    names = dict(model=args.model, num_classes=args.num_classes, sets=args.sets, taps=args.taps, head=args.head)
    given = {k: v for k, v in names.items() if v is not None}
    if args.ema:
        given['ema'] = True
    if Path(args.source).is_dir() and given:
        flags = ', '.join('--' + k.replace('_', '-') for k in given)
        raise ValueError(f'{flags}: only for a checkpoint file; the folder {args.source} holds one model, named in '
                         f'its config.json.')
    return dict(given, **args.model_kwargs)


def model_from_args(args: argparse.Namespace) -> Tuple[nn.Module, Dict[str, Any]]:
    """(model, data-config args of its file) for `eval` / `exit-curve`: --model with --checkpoint, or --model
    local-dir:DIR; the flags that do not apply to a folder are refused by name."""
    if not args.model.startswith(LOCAL_DIR):
        check_model_name(args.model)
    return load_model(args.model, args.checkpoint, num_classes=args.num_classes, ema=args.ema, img_size=args.img_size,
                      given_as=dict(checkpoint='--checkpoint', num_classes='--num-classes', ema='--ema'))
