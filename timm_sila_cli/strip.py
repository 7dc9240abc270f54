"""`timm-sila strip`: keep one branch of a trained SilaNet, written as timm's model.safetensors + config.json."""
import argparse
import json
import math

from safetensors import safe_open

from timm_sila.ship.strip import CONFIG_NAME, WEIGHTS_NAME, strip

from ._common import check_model_name, print_json


def run(args: argparse.Namespace) -> int:
    """Writes the folder, then prints what was written and how to load it (or the JSON result)."""
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
        return 0
    size = result['files'][WEIGHTS_NAME]
    loader = ("timm.create_model('local-dir:{0}', pretrained=True)" if args.branch == 0 else
              "import timm_sila; timm_sila.load_stripped('{0}')").format(out)
    print(f'wrote {out}/{WEIGHTS_NAME} ({size:,} bytes; {params:,} values incl. buffers) and {CONFIG_NAME}\n'
          f'branch {args.branch} as {config["architecture"]} (num_classes={config["num_classes"]}); '
          f'load with {loader}')
    return 0
