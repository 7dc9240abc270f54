"""Demo (`make demo`, about a minute on two CPU cores): train a sila_resnet18 with examples/train_cifar.py, strip
it, reload branch 0 with plain timm.

Default data: scikit-learn's bundled 8x8 digits, upscaled to 16x16 RGB (no download; 16 px keeps all of an 8x8
digit and costs far less than 32 px). With DATA=<dir> (an ImageFolder with train/ and test/, e.g.
../shared/data/cifar10) at most --limit images per split of it are used, at 32 px.
Steps: train (per-branch test accuracy ACC1, ACC2, ACC3 every epoch) -> checkpoint -> stripped branch 0 and 1
folders -> branch 0 reloaded with plain `timm.create_model('local-dir:...', pretrained=True)`, whose test
accuracy and logits must match the trained SilaNet's branch 0.
Outputs (about 100 MB) go to output/demo, which git ignores; each run replaces the previous run's files there
(checkpoint and stripped folders atomically). A non-empty --out that no demo wrote is refused.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import timm
from timm_sila import load_silanet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_cifar  # noqa: E402  the training loop this demo runs


DEFAULT_OUT = Path(__file__).resolve().parents[1] / 'output' / 'demo'
MARKER = '.timm-sila-demo'  # says a folder holds demo outputs, so a new run may replace them


def digits_uint8(size: int = 16, seed: int = 0):
    """sklearn digits as uint8 (N, 3, size, size) images and labels, split 80/20 per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=size, mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=seed, stratify=digits.target)
    return {'train': (images[train], labels[train]), 'test': (images[test], labels[test]),
            'classes': [str(c) for c in range(10)]}


# A short recipe that still trains every branch well past chance on digits: many small steps, gentle lr decay.
EPOCHS, BATCH_SIZE, LR, GAMMA, DIGITS_SIZE = 6, 32, 0.05, 0.7, 16


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', default='sila_resnet18')
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--limit', type=int, default=5000, help='max images per split with DATA')
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help=f'output folder (default: {DEFAULT_OUT})')
    args = parser.parse_args()
    out = args.out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        parser.error(f'{out} is not empty and holds no demo output; pass an empty or new --out folder.')
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()

    data_dir = os.environ.get('DATA')
    img_size = 32 if data_dir else DIGITS_SIZE
    train_args = ['--model', args.model, '--epochs', str(args.epochs), '--batch-size', str(BATCH_SIZE),
                  '--lr', str(LR), '--gamma', str(GAMMA), '--img-size', str(img_size), '--out', str(out),
                  '--seed', '0']
    if data_dir:
        train_args += ['--data-dir', data_dir, '--limit', str(args.limit)]
        data = None
    else:
        data = digits_uint8(img_size)
        print(f'data: sklearn digits (8x8 upscaled to {img_size}x{img_size})')
    final = train_cifar.main(train_args, data=data)

    # reload branch 0 with plain timm: no timm_sila code involved, config.json names the base architecture
    folder = out / final['branch0_dir']  # results.json records paths relative to the output folder
    plain = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    net = load_silanet(out / 'sila_checkpoint.pth.tar')  # the trained SilaNet, all branches
    ckpt_args = torch.load(out / 'sila_checkpoint.pth.tar', weights_only=True)['args']
    mean = torch.tensor(ckpt_args['mean']).view(1, 3, 1, 1)
    std = torch.tensor(ckpt_args['std']).view(1, 3, 1, 1)
    if data is None:
        data = train_cifar.load_data(Path(data_dir), ckpt_args['img_size'], args.limit, None)
    x_test, y_test = data['test']
    with torch.no_grad():
        x = train_cifar.normalize(x_test, mean, std)
        plain_logits = plain(x)
        sila_logits = net.forward_branch(x, 0)
    plain_acc = 100.0 * (plain_logits.argmax(1) == y_test).float().mean().item()
    sila_acc = 100.0 * (sila_logits.argmax(1) == y_test).float().mean().item()
    diff = (plain_logits - sila_logits).abs().max().item()
    print(f'\nstripped branch 0 reloaded with plain timm: timm.create_model("local-dir:{folder}", pretrained=True)')
    print(f'  architecture {plain.pretrained_cfg.get("architecture")}, test top-1 {plain_acc:.2f}% '
          f'(SilaNet branch 0: {sila_acc:.2f}%), max |logit difference| {diff:.2e} '
          f'-> {"MATCH" if plain_acc == sila_acc and diff < 1e-4 else "MISMATCH"}')
    print(f'  branch 1 (compressed) folder: {out / final["branch1_dir"]}; all outputs in {out}')
    if plain_acc != sila_acc or diff >= 1e-4:
        sys.exit(1)


if __name__ == '__main__':
    main()
