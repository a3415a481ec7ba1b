"""Train an MLP whose hidden layers learn their own block sparsity, and get faster as
they do.

Data: scikit-learn's bundled handwritten digits (8x8 images, 64 features, 10 classes;
no download).  Model: ``64 -> hidden -> hidden -> 10`` with the two hidden layers
``learn.L0BlockSparseLinear`` (one hard-concrete gate per B x B weight block) and a small
dense ``nn.Linear`` classifier head.  Nothing is tuned for sparsity: one optimizer over
all parameters at one learning rate (Adam 1e-3 or SGD 0.1), the loss plus
``learn.l0_penalty(model, target_density=t)`` at its default strength, and
``learn.DynamicSparsity(model, optimizer, target_density=t)`` with its defaults, which
removes the lowest-scoring blocks every 100 steps so that the block density follows a
cubic schedule down to ``t`` by step 1000 and then holds it; the block-sparse kernels
compute fewer blocks as it goes.  At the end of an epoch in which the layouts shrank a
lot the storage is compacted (``DynamicSparsity.compact()``, which also moves the
optimizer state).  A dense ``nn.Linear`` MLP of the same shape, trained for the same
epochs with the same optimizer, is the reference.

    python examples/train_dynamic.py --threads 2                 # Adam, lr 1e-3
    python examples/train_dynamic.py --threads 2 --optimizer sgd  # SGD, lr 0.1

Prints a row every few epochs: step, test accuracy, block density of the gated layers
(and the schedule's), wall time of the epoch (training and evaluation); then the dense
reference and a summary.  ``--plot FILE.png`` saves density and accuracy curves (needs
matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# torch and the numba kernels each run an OpenMP thread pool; with the default active
# waiting, a pool that just finished keeps spinning on the cores the other one needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import learn  # noqa: E402
import numbasparse  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress falls back to a printed counter
    tqdm = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=60,
                   help="training epochs (sparse and dense runs; 20 steps each at the default batch size)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden units (multiple of the block size)")
    p.add_argument("--block-size", type=int, default=32, choices=(8, 16, 32), help="B of the B x B weight blocks")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, init, gates and batches")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and the numba kernels (default: their defaults)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="one optimizer for all parameters")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every parameter (default: "
                   "1e-3 for Adam, 0.1 for SGD)")
    p.add_argument("--target-density", type=float, default=0.2, help="block density to reach and hold")
    p.add_argument("--compact-ratio", type=float, default=1.5,
                   help="compact storage at the end of an epoch when capacity > ratio * live blocks (0: never)")
    p.add_argument("--plot", metavar="FILE", default=None, help="save density/accuracy curves (matplotlib)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.hidden < args.block_size or args.hidden % args.block_size:
        p.error("--hidden must be a positive multiple of --block-size")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if not 0.0 < args.target_density <= 1.0:
        p.error("--target-density must be in (0, 1]")
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 0.1
    return args


def load_data(block_size: int, seed: int):
    """Digits as float32 tensors; features standardized and zero-padded to a multiple of
    the block size.  Returns (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    pad = -x.shape[1] % block_size
    x_tr, x_te = (np.pad(a, ((0, 0), (0, pad))) for a in (x_tr, x_te))
    as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return as_t(x_tr, torch.float32), as_t(y_tr, torch.long), as_t(x_te, torch.float32), as_t(y_te, torch.long)


def sparse_mlp(features: int, hidden: int, block_size: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        learn.L0BlockSparseLinear(features, hidden, block_size=block_size), nn.ReLU(),
        learn.L0BlockSparseLinear(hidden, hidden, block_size=block_size), nn.ReLU(),
        nn.Linear(hidden, classes))


def dense_mlp(features: int, hidden: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def progress(items, desc: str):
    if tqdm is not None:
        return tqdm(items, desc=desc, leave=False, ncols=80, file=sys.stderr)
    return _Printed(items, desc)


class _Printed:
    """Minimal progress: prints ``desc i/n`` on one line."""

    def __init__(self, items, desc):
        self.items, self.desc = list(items), desc

    def __iter__(self):
        n = len(self.items)
        for i, item in enumerate(self.items, 1):
            yield item
            if i == n or i % max(1, n // 10) == 0:
                print(f"\r{self.desc} {i}/{n}", end="" if i < n else "\r" + " " * 40 + "\r",
                      file=sys.stderr, flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return 100.0 * correct / len(y)


def warm_up(block_size: int) -> None:
    """Compile (or load from numba's cache) the kernels before anything is timed."""
    layer = learn.L0BlockSparseLinear(2 * block_size, 2 * block_size, block_size=block_size)
    layer.set_layout(layer.layout.remove([0], [1]))
    layer(torch.randn(4, 2 * block_size)).sum().backward()


def make_optimizer(args, model):
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    return torch.optim.SGD(model.parameters(), lr=args.lr)


def shown(epoch: int, epochs: int) -> bool:
    return epoch == 1 or epoch == epochs or epoch % 5 == 0


def train_sparse(args, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    model = sparse_mlp(x_tr.shape[1], args.hidden, args.block_size)
    opt = make_optimizer(args, model)
    ctrl = learn.DynamicSparsity(model, opt, target_density=args.target_density, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    print(f"{'epoch':>5} {'step':>5} {'accuracy':>9} {'density':>8} {'schedule':>8} {'time (s)':>9}")
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        for idx in progress(batches(len(y_tr), args.batch_size, gen), f"epoch {epoch}"):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss = loss + learn.l0_penalty(model, target_density=args.target_density)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctrl.step()
        capacity = sum(layer.layout.capacity for _, layer in ctrl.layers())
        live = sum(layer.layout.nnz for _, layer in ctrl.layers())
        if args.compact_ratio and capacity > args.compact_ratio * live:
            ctrl.compact()
        acc = accuracy(model, x_te, y_te)
        seconds = time.perf_counter() - t0
        density = ctrl.density()
        rows.append((epoch, acc, density, seconds))
        if shown(epoch, args.epochs):
            print(f"{epoch:5d} {ctrl.steps:5d} {acc:9.2f} {density:8.3f} "
                  f"{ctrl.scheduled_density(ctrl.steps):8.3f} {seconds:9.2f}", flush=True)
    return rows, model


def train_dense(args, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    model = dense_mlp(x_tr.shape[1], args.hidden)
    opt = make_optimizer(args, model)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        for idx in progress(batches(len(y_tr), args.batch_size, gen), f"dense {epoch}"):
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rows.append((epoch, accuracy(model, x_te, y_te), 1.0, time.perf_counter() - t0))
    return rows


def plot(path, sparse_rows, dense_rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot saved")
        return
    epochs = [r[0] for r in sparse_rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r[2] for r in sparse_rows], marker="o")
    a.set(xlabel="epoch", ylabel="block density", title="density of the gated layers", ylim=(0, 1.05))
    b.plot(epochs, [r[1] for r in sparse_rows], marker="o", label="L0 block-sparse")
    b.plot(epochs, [r[1] for r in dense_rows], marker="s", label="dense")
    b.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"saved {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        numbasparse.set_num_threads(args.threads)
    data = load_data(args.block_size, args.seed)
    print(f"digits: {len(data[1])} train / {len(data[3])} test, {data[0].shape[1]} features; "
          f"MLP {data[0].shape[1]}-{args.hidden}-{args.hidden}-10, block {args.block_size}, "
          f"target density {args.target_density}, {args.optimizer} lr {args.lr:g} for every parameter")
    warm_up(args.block_size)
    sparse_rows, model = train_sparse(args, data)
    dense_rows = train_dense(args, data)
    first, last = sparse_rows[0][3], sparse_rows[-1][3]
    acc, dense_acc = sparse_rows[-1][1], dense_rows[-1][1]
    print(f"dense MLP, same shape and epochs: accuracy {dense_acc:.2f}, "
          f"{sum(r[3] for r in dense_rows) / len(dense_rows):.2f} s/epoch")
    print(f"L0 block-sparse: accuracy {acc:.2f} ({acc - dense_acc:+.2f} vs dense), density "
          f"{sparse_rows[-1][2]:.3f}, last epoch {last:.2f} s = {100 * last / first:.0f}% of the first "
          f"({first:.2f} s)")
    if args.plot:
        plot(args.plot, sparse_rows, dense_rows)


if __name__ == "__main__":
    main()
