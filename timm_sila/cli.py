"""`timm-sila` console script.

Each subcommand is an `add_<name>_parser(subparsers)` function that adds its parser and sets
`handler=<function(args) -> int>`; append it to `SUBCOMMANDS` to add a subcommand. Exit status: 0 on success,
2 on bad input (one-line message on stderr; `--debug` shows the traceback instead).
"""
import argparse
import json
import math
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ['main', 'build_parser', 'SUBCOMMANDS', 'BAD_INPUT']

# Errors that mean the input was wrong: reported in one line with exit status 2.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
             PermissionError)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _debug_option(parser: argparse.ArgumentParser, default: Any = False) -> None:
    parser.add_argument('--debug', action='store_true', default=default,
                        help='show the full traceback on errors')


def _sila_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--num-classes', type=int, default=None, help='number of classes N')
    parser.add_argument('--img-size', type=int, default=None,
                        help='input size (model kwarg for architectures that take one, e.g. ViT; input_size in '
                             'the exported config)')
    parser.add_argument('--sets', type=int, default=None, help='number of output sets M (sila_sets)')
    parser.add_argument('--taps', default=None,
                        help='comma-separated tap stages, set 1 first (module names or feature_info indices)')
    parser.add_argument('--head', default=None, help='auxiliary head type (sila_head)')
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='extra create_model kwargs, values parsed as JSON when possible')


def _parse_taps(text: Optional[str]) -> Optional[List]:
    if text is None:
        return None
    return [int(t) if t.strip().lstrip('-').isdigit() else t.strip() for t in text.split(',') if t.strip()]


def _parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--model-kwargs expects KEY=VALUE items, got {item!r}.')
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# --- strip --------------------------------------------------------------------------------------------------
def add_strip_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'strip', help='keep one branch of a trained SilaNet, written as timm model.safetensors + config.json',
        description='Keep one output set of a trained SilaNet (paper Sec 2.3) and write it in timm\'s hub format. '
                    'Branch 0 loads with plain timm; branch k >= 1 after `import timm_sila`.')
    p.add_argument('checkpoint', help='timm train.py checkpoint (.pth.tar), state_dict (.pth) or .safetensors')
    p.add_argument('--branch', type=int, required=True, help='set to keep: 0 = base model, k >= 1 = head k')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--model', default=None, help='SilaNet name (e.g. sila_resnet18) when the file does not say')
    _sila_options(p)
    p.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    p.add_argument('--force', action='store_true', help='replace the files of an existing non-empty --out')
    p.add_argument('--json', action='store_true', help='print machine-readable JSON')
    _debug_option(p, default=argparse.SUPPRESS)
    p.set_defaults(handler=run_strip)
    return p


def run_strip(args: argparse.Namespace) -> int:
    from .shipping import CONFIG_NAME, WEIGHTS_NAME, strip
    from safetensors import safe_open
    out = strip(args.checkpoint, branch=args.branch, out_dir=args.out, ema=args.ema, overwrite=args.force,
                model=args.model, num_classes=args.num_classes, sets=args.sets, taps=_parse_taps(args.taps),
                head=args.head, img_size=args.img_size, **_parse_kwargs(args.model_kwargs))
    config = json.loads((out / CONFIG_NAME).read_text())
    with safe_open(str(out / WEIGHTS_NAME), framework='pt') as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    result = dict(out_dir=str(out), branch=args.branch, architecture=config['architecture'],
                  num_classes=config['num_classes'], stored_values=params,
                  files={name: (out / name).stat().st_size for name in (WEIGHTS_NAME, CONFIG_NAME)})
    if args.json:
        _print_json(result)
    else:
        size = result['files'][WEIGHTS_NAME]
        loader = ("timm.create_model('local-dir:{0}', pretrained=True)" if args.branch == 0 else
                  "import timm_sila; timm_sila.load_stripped('{0}')").format(out)
        print(f'wrote {out}/{WEIGHTS_NAME} ({size:,} bytes; {params:,} values incl. buffers) and {CONFIG_NAME}\n'
              f'branch {args.branch} as {config["architecture"]} (num_classes={config["num_classes"]}); '
              f'load with {loader}')
    return 0


# --- info ---------------------------------------------------------------------------------------------------
def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'info', help='taps, params, size and compression ratio of every branch (paper Table 3)',
        description='Per branch: parameter count, fp32 size in MB (1 MB = 2^20 bytes) and compression ratio '
                    'CR = 1 - params(branch)/params(base); plus the train-time size of the whole SilaNet.')
    p.add_argument('model', help='sila_<arch> or <arch>, e.g. sila_resnet18')
    _sila_options(p)
    p.add_argument('--json', action='store_true', help='print machine-readable JSON')
    _debug_option(p, default=argparse.SUPPRESS)
    p.set_defaults(handler=run_info)
    return p


def format_info(info: Dict[str, Any]) -> str:
    lines = [f'{info["model"]}  num_classes={info["num_classes"]}  img_size={info["img_size"]}  '
             f'sets={info["sets"]}  head={info["head"]}',
             'taps: ' + ', '.join(f'set {k}={t}' for k, t in enumerate(info['taps'], start=1)),
             f'{"branch":>6}  {"exit":<16}{"params":>14}  {"size (MB)":>10}  {"CR":>8}']
    for row in info['branches']:
        lines.append(f'{row["branch"]:>6}  {row["exit"]:<16}{row["params"]:>14,}  {row["size_mb"]:>10.2f}  '
                     f'{row["cr"] * 100:>7.2f}%')
    train = info['train']
    lines.append(f'{"train":>6}  {"all sets":<16}{train["params"]:>14,}  {train["size_mb"]:>10.2f}')
    lines.append('MB = fp32 parameters (4 bytes each) / 2^20; CR = 1 - params(branch) / params(branch 0)')
    return '\n'.join(lines)


def run_info(args: argparse.Namespace) -> int:
    from .shipping import model_info
    if args.num_classes is None:
        raise ValueError('info needs --num-classes N.')
    info = model_info(args.model, num_classes=args.num_classes, img_size=args.img_size, sets=args.sets,
                      taps=_parse_taps(args.taps), head=args.head, **_parse_kwargs(args.model_kwargs))
    if args.json:
        _print_json(info)
    else:
        print(format_info(info))
    return 0


# --- entry point --------------------------------------------------------------------------------------------
def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    from .evaluation import add_eval_parser as add
    return add(subparsers)


def add_exit_curve_parser(subparsers) -> argparse.ArgumentParser:
    from .exit_curve import add_exit_curve_parser as add
    return add(subparsers)


SUBCOMMANDS: List[Callable] = [add_strip_parser, add_info_parser, add_eval_parser, add_exit_curve_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='timm-sila', description='SilaNet tools for timm models.')
    _debug_option(parser)
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import timm_sila  # noqa: F401  registers sila_* names
        return args.handler(args)
    except BAD_INPUT as e:
        if getattr(args, 'debug', False):
            raise
        message = ' '.join(str(e).split()) or type(e).__name__
        print(f'timm-sila {args.command}: error: {message}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
