"""Demo: train a sila_resnet18 on a small data set on CPU and report each branch's test accuracy.

Default data: scikit-learn's bundled 8×8 digits, upscaled to 32×32 RGB (no download). With DATA=<dir>
(an ImageFolder with train/ and test/ sub-folders, e.g. ../shared/data/cifar10) that data is used instead.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import timm
import timm_sila


def digits_tensors(seed: int = 0):
    """sklearn digits as (N, 3, 32, 32) float tensors in [0, 1] and labels, split 80/20 per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=32, mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=digits.target)
    return (images[idx_train], labels[idx_train]), (images[idx_test], labels[idx_test]), 10


def image_folder_tensors(root: str, limit: int):
    """An ImageFolder's train/ and test/ splits decoded once into memory (at most `limit` images each)."""
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])

    def load(split):
        ds = datasets.ImageFolder(os.path.join(root, split), transform=tf)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit]
        xs, ys = zip(*(ds[int(i)] for i in order))
        return torch.stack(xs), torch.tensor(ys)

    train = load('train')
    return train, load('test'), int(train[1].max()) + 1


def evaluate(model, images, labels, batch_size=256):
    """Top-1 accuracy (%) of every branch, from one backbone pass per batch."""
    model.eval()
    correct = torch.zeros(model.sets)
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            outs = model.forward_branches(images[i:i + batch_size])
            for k, logits in enumerate(outs):
                correct[k] += (logits.argmax(-1) == labels[i:i + batch_size]).sum()
    return (100.0 * correct / len(labels)).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', default='sila_resnet18')
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--limit', type=int, default=5000, help='max images per split with DATA')
    args = parser.parse_args()
    torch.manual_seed(0)

    data_dir = os.environ.get('DATA')
    if data_dir:
        (x_train, y_train), (x_test, y_test), num_classes = image_folder_tensors(data_dir, args.limit)
        source = data_dir
    else:
        (x_train, y_train), (x_test, y_test), num_classes = digits_tensors()
        source = 'sklearn digits (8x8 upscaled to 32x32)'
    mean = x_train.mean((0, 2, 3), keepdim=True)
    std = x_train.std((0, 2, 3), keepdim=True)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = timm.create_model(args.model, num_classes=num_classes)
    criterion = timm_sila.SilaLoss(num_classes, beta=model.beta, decay=model.decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * -(-len(y_train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    print(f'{args.model}: {num_classes} classes, taps {model.taps} (set 1 = deepest), '
          f'{len(y_train)} train / {len(y_test)} test images from {source}')

    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            loss = criterion(model(x_train[idx]), y_train[idx])  # (B, M·N) logits, one softmax
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        accs = evaluate(model, x_test, y_test)
        acc_text = '  '.join(f'ACC{k + 1} {a:5.1f}' for k, a in enumerate(accs))
        print(f'epoch {epoch + 1:2d}  loss {total / len(y_train):.3f}  {acc_text}  ({time.time() - start:.0f}s)')

    print('\nbranch  test top-1  (branch 0 = unchanged base model, k >= 1 = compressed prefix + head k)')
    for k, acc in enumerate(evaluate(model, x_test, y_test)):
        print(f'{k:6d}  {acc:9.2f}%')


if __name__ == '__main__':
    main()
