"""Reaching a target block density without tuning: the README's ``learn`` loop, run as it
is on two models and two optimizers.

Data: scikit-learn's bundled handwritten digits (8x8 images, 10 classes; no download).
Models, each with gated (L0) block-sparse layers and a small dense head:

* ``mlp``: 64 -> 1024 -> 1024 -> 10, the two hidden layers ``L0BlockSparseLinear`` (B = 32);
* ``cnn``: a 3x3 convolution to 32 channels, then two ``L0BlockSparseConv2d`` (64 and 64
  channels, B = 16, 3x3, a 2x2 max-pool between them) and a linear head on the 4x4 maps.

Each model trains with one optimizer over all of its parameters at a common learning
rate (Adam 1e-3, SGD 0.1), with ``learn.l0_penalty`` at its default strength and
``learn.DynamicSparsity`` at its defaults, for ``--steps`` steps; a reference run of the
same model without the penalty and the controller (all blocks kept) gives the accuracy
to compare with.

    python examples/target_density.py                          # both models, both optimizers
    python examples/target_density.py --models mlp --optimizers sgd

Prints one row per run: block density at steps 500, 1000 and the end, the schedule's
density at the end, test accuracy of the sparse model and of the reference.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from numbasparse import learn

OPTIMIZERS = {"adam": "Adam, lr 1e-3", "sgd": "SGD, lr 0.1"}


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """One optimizer over all parameters at a common learning rate."""
    if name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return optimizer


def mlp() -> torch.nn.Module:
    model = torch.nn.Sequential(learn.L0BlockSparseLinear(64, 1024, block_size=32), torch.nn.ReLU(),
                                learn.L0BlockSparseLinear(1024, 1024, block_size=32), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    return model


def cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        learn.L0BlockSparseConv2d(32, 64, 3, block_size=16, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),                                                  # 8x8 -> 4x4
        learn.L0BlockSparseConv2d(64, 64, 3, block_size=16, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10))


MODELS = {"mlp": mlp, "cnn": cnn}


def load(seed: int):
    """Digits as float32 [N, 64] in [0, 1] and int64 labels, split 70/30."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def batch_stream(x, y, steps: int, batch_size: int, seed: int):
    """``steps`` shuffled mini-batches ``(x [batch, 64], y [batch])``, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(y), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield x[idx], y[idx]


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        out = (model(x).argmax(1) == y).float().mean().item() * 100
    model.train()
    return out


def train_to_target(model, optimizer, batches):
    """The README's loop, line for line (target density 0.2); returns the controller and
    its reports."""
    controller = learn.DynamicSparsity(model, optimizer, target_density=0.2)
    reports = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + learn.l0_penalty(model, target_density=0.2)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        report = controller.step()          # a SparsityReport on update steps: density per layer, removed, regrown
        if report is not None:
            reports.append(report)
    return controller, reports


def train_reference(model, optimizer, batches) -> None:
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()


def density_at(reports, step: int) -> float:
    """Block density after the last update at or before ``step``."""
    seen = [r.density for r in reports if r.step <= step]
    return seen[-1] if seen else 1.0


def run(model_name: str, optimizer_name: str, args, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    model = MODELS[model_name]()
    optimizer = make_optimizer(optimizer_name, model)
    t0 = time.perf_counter()
    controller, reports = train_to_target(model, optimizer,
                                          batch_stream(x_tr, y_tr, args.steps, args.batch_size, args.seed))
    seconds = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    reference = MODELS[model_name]()
    train_reference(reference, make_optimizer(optimizer_name, reference),
                    batch_stream(x_tr, y_tr, args.steps, args.batch_size, args.seed))
    return {"d500": density_at(reports, 500), "d1000": density_at(reports, 1000),
            "final": controller.density(), "scheduled": controller.scheduled_density(controller.steps),
            "accuracy": accuracy(model, x_te, y_te), "reference": accuracy(reference, x_te, y_te),
            "seconds": seconds}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    p.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), default=["adam", "sgd"])
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the kernels")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load(args.seed)
    print(f"digits, {args.steps} steps of batch {args.batch_size}, target density 0.2; "
          f"the first run compiles the kernels", flush=True)
    print(f"{'model':>5} {'optimizer':>13} {'d@500':>6} {'d@1000':>6} {'d@end':>6} {'sched':>6} "
          f"{'acc %':>6} {'ref %':>6} {'time s':>7}")
    for model_name in args.models:
        for optimizer_name in args.optimizers:
            r = run(model_name, optimizer_name, args, data)
            label = OPTIMIZERS[optimizer_name]
            print(f"{model_name:>5} {label:>13} {r['d500']:6.3f} {r['d1000']:6.3f} {r['final']:6.3f} "
                  f"{r['scheduled']:6.3f} {r['accuracy']:6.2f} {r['reference']:6.2f} {r['seconds']:7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
