"""`timm-sila info`: taps, params, size and compression ratio of every branch before training (paper Table 3)."""
import argparse
from typing import Any, Dict

from timm_sila.measure.sizes import model_info

from ._common import check_model_name, print_json


def format_info(info: Dict[str, Any]) -> str:
    """The `model_info` result as the table `timm-sila info` prints (paper Table 3 columns)."""
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


def run(args: argparse.Namespace) -> int:
    """Prints the branch table of --model (or the JSON result)."""
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
