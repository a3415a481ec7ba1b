"""Quickstart: a block-sparse MLP next to a dense one on scikit-learn's bundled digits.

    python examples/quickstart.py [--epochs 15] [--density 0.25] [--block-size 16]

The 8x8 digit images (1797 samples, shipped with scikit-learn, no download) are
flattened to 64 features.  Both models have the same shape, 64 -> 512 -> 512 -> 10;
the sparse one uses BlockSparseLinear layers with small-world / random layouts.
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

import numbasparse as ns


def load_digits_tensors(seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("this example needs scikit-learn: pip install 'numbasparse[examples]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def sparse_mlp(hidden, block_size, density, seed):
    blocks = hidden // block_size
    return nn.Sequential(
        ns.BlockSparseLinear(64, hidden, ns.layouts.random(64 // block_size, blocks, max(density, 0.5), seed=seed),
                             block_size=block_size),
        nn.ReLU(),
        ns.BlockSparseLinear(hidden, hidden, ns.layouts.watts_strogatz(blocks, k=max(2, int(density * blocks) // 2 * 2),
                                                                      p=0.2, seed=seed), block_size=block_size),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def dense_mlp(hidden):
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(name, model, data, epochs, batch_size, seed):
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = evaluate(model, x_test, y_test)
        print(f"  {name:>6} epoch {epoch:2d}/{epochs}  loss {loss.item():.3f}  test accuracy {accuracy:6.2%}", flush=True)
    return accuracy, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16, choices=(8, 16, 32))
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = load_digits_tensors(args.seed)
    sparse = sparse_mlp(args.hidden, args.block_size, args.density, args.seed)
    hidden_layer = sparse[2]
    print(f"digits: {len(data[0])} train / {len(data[2])} test samples; hidden {args.hidden}, "
          f"block {args.block_size}, hidden-layer layout {hidden_layer.layout}")
    torch.manual_seed(args.seed)
    dense = dense_mlp(args.hidden)

    sparse_acc, sparse_time = train("sparse", sparse, data, args.epochs, args.batch_size, args.seed)
    dense_acc, dense_time = train("dense", dense, data, args.epochs, args.batch_size, args.seed)

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print()
    print(f"{'model':<8}{'parameters':>12}{'accuracy':>10}{'time (s)':>10}")
    print(f"{'sparse':<8}{count(sparse):>12,}{sparse_acc:>10.2%}{sparse_time:>10.1f}")
    print(f"{'dense':<8}{count(dense):>12,}{dense_acc:>10.2%}{dense_time:>10.1f}")


if __name__ == "__main__":
    main()
