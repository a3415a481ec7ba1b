"""Prune a trained dense model and serve it fast on the CPU: ``numbasparse.sparsify`` and
``learn.GradualPruning``.

Data: scikit-learn's bundled handwritten digits (8x8 images, 64 features, 10 classes;
no download).  Model: an MLP ``64 -> hidden -> hidden -> 10`` of ``nn.Linear`` layers.

1. Train the dense model (Adam).
2. ``numbasparse.sparsify(model, density=1.0)`` turns every ``nn.Linear`` whose sizes are
   multiples of the block size into a ``BlockSparseLinear`` keeping all blocks (the same
   function); the 10-way head stays dense and is reported as skipped.
3. Fine-tune while ``learn.GradualPruning`` removes the blocks of smallest norm on the
   cubic schedule down to ``--density``; the layouts shrink as it prunes, then the storage
   is compacted.
4. Report accuracy before and after, and CPU inference latency (``torch.inference_mode``,
   median of interleaved rounds) of the dense and the pruned model at batch 1 and 64;
   export the pruned model with ``torch.export`` and check the exported program gives the
   same outputs.

    python examples/prune_for_cpu.py                    # about a minute on 2 cores
    python examples/prune_for_cpu.py --quick            # a few seconds
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import numbasparse
from numbasparse import learn

try:
    from tqdm import tqdm
except ImportError:  # progress falls back to a printed counter
    tqdm = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024, help="hidden units (multiple of the block size)")
    p.add_argument("--block-size", type=int, default=32, choices=(8, 16, 32), help="B of the B x B blocks")
    p.add_argument("--density", type=float, default=0.1, help="block density to prune to")
    p.add_argument("--train-steps", type=int, default=600, help="dense training steps")
    p.add_argument("--prune-steps", type=int, default=1200,
                   help="fine-tuning steps; pruning runs over the first two thirds")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=None, help="threads for torch and the kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="few steps and rounds (a smoke run)")
    args = p.parse_args(argv)
    if args.hidden < 1 or args.hidden % args.block_size:
        p.error("--hidden must be a positive multiple of --block-size")
    if not 0.0 < args.density <= 1.0:
        p.error("--density must be in (0, 1]")
    if min(args.train_steps, args.prune_steps, args.batch_size, args.repeats) < 1:
        p.error("--train-steps, --prune-steps, --batch-size and --repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.quick:
        args.train_steps, args.prune_steps, args.repeats = 60, 90, 3
    return args


def load(seed: int):
    """Digits as float32 ``[N, 64]`` in [0, 1] and int64 labels, split 70/30."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def mlp(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def batches(x, y, steps: int, batch_size: int, seed: int):
    """``steps`` shuffled mini-batches, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(y), generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        yield x[idx], y[idx]


def progress(iterable, total: int, desc: str):
    if tqdm is not None:
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return _counter(iterable, total, desc)


def _counter(iterable, total, desc):
    for i, item in enumerate(iterable, 1):
        if i % max(1, total // 10) == 0 or i == total:
            print(f"{desc}: {i}/{total}", flush=True)
        yield item


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.inference_mode():
        out = (model(x).argmax(1) == y).float().mean().item() * 100
    model.train()
    return out


def train_dense(model, data, args) -> None:
    x_tr, y_tr = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in progress(batches(x_tr, y_tr, args.train_steps, args.batch_size, args.seed),
                         args.train_steps, "dense training"):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()


def prune(model, data, args):
    """Fine-tune ``model`` while GradualPruning takes it to ``args.density``; returns the
    pruning controller."""
    x_tr, y_tr = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    end = max(1, (2 * args.prune_steps) // 3)
    pruning = learn.GradualPruning(model, opt, final_density=args.density, start_step=0, end_step=end,
                                   every=max(1, end // 20))
    bar = progress(batches(x_tr, y_tr, args.prune_steps, args.batch_size, args.seed + 1),
                   args.prune_steps, "pruning")
    for x, y in bar:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        report = pruning.step()
        if report is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(density=f"{report.density:.3f}")
    pruning.compact()
    return pruning


def latency_ms(dense, pruned, batch: int, repeats: int, features: int) -> tuple:
    """Median milliseconds per call of ``dense`` and ``pruned`` at ``batch`` rows, timed in
    interleaved rounds under ``torch.inference_mode``."""
    x = torch.randn(batch, features)
    calls = 200 if batch == 1 else 50
    times = {"dense": [], "pruned": []}
    with torch.inference_mode():
        for model in (dense, pruned):
            for _ in range(10):
                model(x)
        for _ in range(repeats):
            for name, model in (("dense", dense), ("pruned", pruned)):
                t0 = time.perf_counter()
                for _ in range(calls):
                    model(x)
                times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times["dense"]), statistics.median(times["pruned"])


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load(args.seed)
    x_te, y_te = data[2], data[3]
    torch.manual_seed(args.seed)
    dense = mlp(data[0].shape[1], args.hidden)
    print(f"digits: {len(data[1])} train / {len(y_te)} test; MLP 64-{args.hidden}-{args.hidden}-10, "
          f"block {args.block_size}, pruned to density {args.density}", flush=True)
    train_dense(dense, data, args)
    dense_acc = accuracy(dense, x_te, y_te)
    print(f"dense accuracy: {dense_acc:.2f}%", flush=True)

    model, report = numbasparse.sparsify(copy.deepcopy(dense), density=1.0, block_size=args.block_size,
                                         return_report=True)
    print(report, flush=True)
    print("fine-tuning while pruning (the first calls compile the kernels)", flush=True)
    pruning = prune(model, data, args)
    pruned_acc = accuracy(model, x_te, y_te)
    print(f"pruned accuracy: {pruned_acc:.2f}% ({pruned_acc - dense_acc:+.2f} vs dense), block density "
          f"{pruning.density():.3f} of the converted layers")

    model.eval()
    dense.eval()
    print(f"{'batch':>5} {'dense ms':>9} {'pruned ms':>10} {'speedup':>8}")
    for batch in (1, 64):
        d_ms, p_ms = latency_ms(dense, model, batch, args.repeats, data[0].shape[1])
        print(f"{batch:5d} {d_ms:9.3f} {p_ms:10.3f} {d_ms / p_ms:7.2f}x", flush=True)

    x = x_te[:8]
    program = torch.export.export(model, (x,))
    with torch.inference_mode():
        same = torch.allclose(program.module()(x), model(x), atol=1e-5)
    print(f"torch.export: {sum(1 for n in program.graph.nodes if 'numbasparse' in str(n.target))} "
          f"numbasparse operators in the graph; exported outputs {'match' if same else 'DIFFER'}")
    if not same:
        raise SystemExit("the exported program differs from the eager model")


if __name__ == "__main__":
    main()
