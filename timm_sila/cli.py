"""Handlers of the `timm-sila` strip and info commands, and checks shared by every command's handler.

The parsers and `main` live in the torch-free `timm_sila_cli` package (so `--help` answers at once); `main` is
re-exported here for `python -m timm_sila.cli` and `from timm_sila.cli import main`.
"""
import argparse
import difflib
import json
import math
import sys
from typing import Any, Dict

import timm

from timm_sila_cli import BAD_INPUT, build_parser, main

from .config import sila_name

__all__ = ['main', 'build_parser', 'BAD_INPUT', 'run_strip', 'run_info', 'format_info', 'check_model_name',
           'print_json']


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


# --- strip --------------------------------------------------------------------------------------------------
def run_strip(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from timm_sila.ship.strip import CONFIG_NAME, WEIGHTS_NAME, strip
    if args.model is not None:
        check_model_name(args.model)
    out = strip(args.checkpoint, branch=args.branch, out_dir=args.out, ema=args.ema, overwrite=args.force,
                model=args.model, num_classes=args.num_classes, sets=args.sets, taps=args.taps,
                head=args.head, img_size=args.img_size, metrics=args.metrics, card=args.card, **args.model_kwargs)
    config = json.loads((out / CONFIG_NAME).read_text())
    with safe_open(str(out / WEIGHTS_NAME), framework='pt') as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    result = dict(out_dir=str(out), branch=args.branch, architecture=config['architecture'],
                  num_classes=config['num_classes'], stored_values=params,
                  files={name: (out / name).stat().st_size for name in (WEIGHTS_NAME, CONFIG_NAME)})
    if args.json:
        print_json(result)
    else:
        size = result['files'][WEIGHTS_NAME]
        loader = ("timm.create_model('local-dir:{0}', pretrained=True)" if args.branch == 0 else
                  "import timm_sila; timm_sila.load_stripped('{0}')").format(out)
        print(f'wrote {out}/{WEIGHTS_NAME} ({size:,} bytes; {params:,} values incl. buffers) and {CONFIG_NAME}\n'
              f'branch {args.branch} as {config["architecture"]} (num_classes={config["num_classes"]}); '
              f'load with {loader}')
    return 0


# --- info ---------------------------------------------------------------------------------------------------
def format_info(info: Dict[str, Any]) -> str:
    lines = [f'{info["model"]}  num_classes={info["num_classes"]}  img_size={info["img_size"]}  '
             f'sets={info["sets"]}  head={info["head"]}',
             'taps: ' + ', '.join(f'set {k}={t}' for k, t in enumerate(info['taps'], start=1)),
             f'{"branch":>6}  {"exit":<16}{"params":>14}  {"size (MB)":>10}  {"CR":>8}']
    for row in info['branches']:
        if row['params'] is None:
            lines.append(f'{row["branch"]:>6}  {row["exit"]:<16}  cannot be compressed: timm gives '
                         f'{info["arch"]} no prune_intermediate_layers')
            continue
        lines.append(f'{row["branch"]:>6}  {row["exit"]:<16}{row["params"]:>14,}  {row["size_mb"]:>10.2f}  '
                     f'{row["cr"] * 100:>7.2f}%')
    train = info['train']
    lines.append(f'{"train":>6}  {"all sets":<16}{train["params"]:>14,}  {train["size_mb"]:>10.2f}')
    lines.append('MB = fp32 parameters (4 bytes each) / 2^20; CR = 1 - params(branch) / params(branch 0)')
    return '\n'.join(lines)


def run_info(args: argparse.Namespace) -> int:
    from timm_sila.measure.sizes import model_info
    if args.num_classes is None:
        raise ValueError('info needs --num-classes N.')
    check_model_name(args.model)
    try:
        info = model_info(args.model, num_classes=args.num_classes, img_size=args.img_size, sets=args.sets,
                          taps=args.taps, head=args.head, **args.model_kwargs)
    except TypeError as e:  # timm's model class refused a --model-kwargs key
        raise ValueError(f'cannot build {args.model} with --model-kwargs {args.model_kwargs}: {e}') from e
    if args.json:
        print_json(info)
    else:
        print(format_info(info))
    return 0


if __name__ == '__main__':
    sys.exit(main())
