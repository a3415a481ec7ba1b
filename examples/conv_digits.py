"""A small CNN on scikit-learn's bundled 8x8 digits: dense convolutions against
block-sparse ones (BlockSparseConv2d) at about the same parameter count, the sparse
network being twice as wide with a quarter of the channel blocks.

    python examples/conv_digits.py --epochs 15 --seed 0

Prints per-epoch loss, test accuracy and time for both networks.  Runs on the CPU in
well under two minutes (the first run also compiles the numba kernels).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import numbasparse as ns


def dense_net(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                     # 8x8 -> 4x4
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 10))


def sparse_net(width: int, block_size: int, density: float, seed: int) -> nn.Sequential:
    """Same shape as :func:`dense_net`, the two inner convolutions block-sparse over
    channels (random layouts of the given density)."""
    b1, b2 = width // block_size, 2 * width // block_size
    layout1 = ns.layouts.random(b1, b2, density, seed=seed)
    layout2 = ns.layouts.random(b2, b2, density, seed=seed + 1)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        ns.BlockSparseConv2d(width, 2 * width, 3, layout1, block_size, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        ns.BlockSparseConv2d(2 * width, 2 * width, 3, layout2, block_size, padding="same"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, 10))


def data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0   # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    x = (x - x[order[:split]].mean()) / x[order[:split]].std()
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def train(name, model, train_set, test_set, epochs, seed, batch_size=64, lr=3e-3):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x_train, y_train = train_set
    x_test, y_test = test_set
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params} parameters")
    times = []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train))
        start = time.perf_counter()
        total = 0.0
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"  epoch {epoch:2d}  loss {total / len(x_train):.4f}  test accuracy {acc:.4f}  "
              f"{times[-1] * 1e3:7.1f} ms/epoch")
    steady = np.median(times[1:]) if len(times) > 1 else times[0]
    return acc, steady, params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32))
    parser.add_argument("--density", type=float, default=0.25, help="block density of the sparse convolutions")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and the numba kernels (these layers are too small to gain from more)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ns.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_set, test_set = data(args.seed)
    width = 32
    # width / sqrt(density) (a multiple of the block size): the inner convolutions keep
    # their parameter count (twice the width at density 1/4)
    sparse_width = args.block_size * max(1, round(width / args.density ** 0.5 / args.block_size))
    torch.manual_seed(args.seed)
    dense = dense_net(width)
    torch.manual_seed(args.seed)
    sparse = sparse_net(sparse_width, args.block_size, args.density, args.seed)
    results = {"dense": train(f"dense CNN (width {width})", dense, train_set, test_set, args.epochs, args.seed),
               "block-sparse": train(f"block-sparse CNN (width {sparse_width}, B={args.block_size}, "
                                     f"density {args.density})", sparse, train_set, test_set, args.epochs, args.seed)}
    print("\nsummary (time: median over epochs after the first, which includes compilation)")
    for name, (acc, sec, params) in results.items():
        print(f"  {name:<13} params {params:6d}  test accuracy {acc:.4f}  {sec * 1e3:7.1f} ms/epoch")


if __name__ == "__main__":
    main()
