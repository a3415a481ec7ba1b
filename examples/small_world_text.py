"""Sparse-wide small-world LSTMs on real text: a character-level language model on the
Python standard library's own source, dense against block-sparse at equal parameters.

Data: the ``*.py`` files at the top of the standard library of the running Python
(``sysconfig.get_paths()["stdlib"]``, present on every install; no download), read as
bytes (256 symbols).  Split by file, fixed: a file goes to test when
``zlib.crc32(name) % 10 == 0``, to validation when it is 1, to training otherwise;
each split is its files' bytes concatenated in name order, cut to ``--train-bytes``,
``--valid-bytes`` and ``--test-bytes``.  An epoch is one pass over the training bytes
as ``--batch`` parallel streams in windows of ``--seq`` characters (truncated BPTT,
state carried between windows).

Models (embedding ``--embed`` -> one LSTM layer -> linear read-out to 256 symbols), all
with the same number of parameters (sparse layers count their live blocks only):

* ``dense``: ``nn.LSTM`` with ``--hidden`` units;
* ``small-world``: :class:`numbasparse.BlockSparseLSTM` ``--wide`` times wider, its
  recurrent layout a Watts-Strogatz graph over the hidden blocks (each block reads
  itself, ``k`` ring neighbours and rewired long-range blocks, ``--rewire``) for all
  four gates, ``k`` chosen so the parameter count matches the dense model's;
* ``random``: the same width and number of blocks, the blocks placed at random;
* ``L0``: :class:`learn.L0BlockSparseLSTM` of the same width starting dense, its
  gates and :class:`learn.DynamicSparsity` bringing it to the same density over the
  first ``--ramp`` of training.

Prints test bits per character (the loss in base 2, on the test split with the state
carried across windows) of each model at its best validation epoch, parameters and
wall time per epoch.

    python examples/small_world_text.py            # full run (see BENCHMARKS.md)
    python examples/small_world_text.py --quick    # a small run in a few minutes
"""
from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sys
import sysconfig
import time
import zlib

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # torch's and the kernels' threads take turns

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import learn  # noqa: E402
import numbasparse  # noqa: E402
from numbasparse import layouts  # noqa: E402

MODELS = ("dense", "small-world", "random", "L0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden units of the dense LSTM")
    p.add_argument("--wide", type=int, default=2, help="the sparse LSTMs are this many times wider")
    p.add_argument("--block-size", type=int, default=32, choices=(8, 16, 32), help="B of the B x B blocks")
    p.add_argument("--embed", type=int, default=64, help="embedding size of the input bytes")
    p.add_argument("--rewire", type=float, default=0.2, help="Watts-Strogatz rewiring probability")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training bytes")
    p.add_argument("--train-bytes", type=int, default=1 << 20, help="training bytes used")
    p.add_argument("--valid-bytes", type=int, default=1 << 17, help="validation bytes used")
    p.add_argument("--test-bytes", type=int, default=1 << 18, help="test bytes used")
    p.add_argument("--batch", type=int, default=32, help="parallel streams")
    p.add_argument("--seq", type=int, default=64, help="characters per truncated-BPTT window")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (all models)")
    p.add_argument("--ramp", type=float, default=0.4, help="L0 model: fraction of training to reach the density")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train")
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the layouts, init and gates")
    p.add_argument("--quick", action="store_true",
                   help="small run: hidden 128, block 8, 64 KiB of training text, 2 epochs, 16 KiB validation and "
                        "test")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.embed, args.epochs = min(args.hidden, 128), min(args.embed, 32), min(args.epochs, 2)
        args.block_size = min(args.block_size, 8)
        args.train_bytes, args.valid_bytes, args.test_bytes = 1 << 16, 1 << 14, 1 << 14
    if args.hidden * args.wide % args.block_size:
        p.error(f"--hidden x --wide = {args.hidden * args.wide} must be a multiple of --block-size")
    return args


# ----------------------------------------------------------------------------- data
def stdlib_splits() -> dict:
    """``{"train": bytes, "valid": bytes, "test": bytes}`` of the stdlib's top-level sources."""
    root = sysconfig.get_paths()["stdlib"]
    parts = {"train": [], "valid": [], "test": []}
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        bucket = zlib.crc32(os.path.basename(path).encode()) % 10
        with open(path, "rb") as f:
            parts["test" if bucket == 0 else "valid" if bucket == 1 else "train"].append(f.read())
    return {name: b"".join(chunks) for name, chunks in parts.items()}


def streams(data: bytes, limit: int, batch: int) -> torch.Tensor:
    """``(L, batch)`` int64: the first ``limit`` bytes cut into ``batch`` parallel streams."""
    data = data[:limit]
    length = len(data) // batch
    if length < 2:
        raise SystemExit(f"only {len(data)} bytes for {batch} streams")
    flat = torch.frombuffer(bytearray(data[:length * batch]), dtype=torch.uint8).long()
    return flat.view(batch, length).t().contiguous()


# ----------------------------------------------------------------------------- models
class CharLM(nn.Module):
    """Bytes ``(T, N)`` -> logits ``(T, N, 256)``: embedding, one LSTM, linear read-out."""

    def __init__(self, rnn: nn.Module, embed: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.rnn = rnn
        self.head = nn.Linear(width, 256)

    def forward(self, x, state=None):
        out, state = self.rnn(self.embed(x), state)
        return self.head(out), state


def live_parameters(model: nn.Module) -> int:
    """Parameters, counting only the live blocks of block-sparse weights (gates excluded)."""
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "log_alpha":
                continue
            if name == "weight" and hasattr(module, "layout") and param.dim() == 3:
                total += module.layout.nnz * param.shape[1] * param.shape[2]
            else:
                total += param.numel()
    return total


def dense_model(args) -> CharLM:
    return CharLM(nn.LSTM(args.embed, args.hidden), args.embed, args.hidden)


def matched_graph_degree(args, target: int) -> int:
    """Watts-Strogatz ``k`` (even) whose sparse model has the parameter count nearest ``target``."""
    width, block = args.hidden * args.wide, args.block_size
    n = width // block
    base = live_parameters(CharLM(numbasparse.BlockSparseLSTM(args.embed, width, layouts.dense(n, 4 * n), block),
                                  args.embed, width)) - 4 * n * n * block * block
    per_degree = 4 * n * block * block    # one more neighbour on each side adds 2 of these
    best = min(range(0, n - 1, 2), key=lambda k: abs(base + (k + 1) * per_degree - target))
    return best


def sparse_model(args, layout, gated=False) -> CharLM:
    width = args.hidden * args.wide
    if gated:
        rnn = learn.L0BlockSparseLSTM(args.embed, width, None, args.block_size, seed=args.seed)
    else:
        rnn = numbasparse.BlockSparseLSTM(args.embed, width, layout, args.block_size)
    return CharLM(rnn, args.embed, width)


# ----------------------------------------------------------------------------- training
def bits_per_char(model: CharLM, data: torch.Tensor, seq: int) -> float:
    model.eval()
    state, total, count = None, 0.0, 0
    with torch.no_grad():
        for start in range(0, data.shape[0] - 1, seq):
            x, y = data[start:start + seq], data[start + 1:start + seq + 1]
            x = x[:y.shape[0]]
            logits, state = model(x, state)
            total += F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count / math.log(2)


def progress(done: int, total: int, what: str, started: float, loss: float) -> None:
    width = 30
    filled = width * done // total
    print(f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
          f"loss {loss / math.log(2):.3f} bpc {time.perf_counter() - started:6.1f} s",
          end="" if done < total else "\n", file=sys.stderr, flush=True)


def train(name: str, model: CharLM, args, data: dict) -> dict:
    torch.manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_data = data["train"]
    windows = list(range(0, train_data.shape[0] - 1, args.seq))
    total_steps = args.epochs * len(windows)
    control = None
    if name == "L0":
        control = learn.DynamicSparsity(model, optimizer, every=max(1, total_steps // 40),
                                        target_density=args.target_density,
                                        ramp=int(args.ramp * total_steps))
    epoch_seconds, step = [], 0
    best = (math.inf, 0, None)          # validation bpc, epoch, state: the test split scores the best epoch
    for epoch in range(args.epochs):
        state, started = None, time.perf_counter()
        for done, start in enumerate(windows, 1):
            x, y = train_data[start:start + args.seq], train_data[start + 1:start + args.seq + 1]
            x = x[:y.shape[0]]
            logits, state = model(x, state)
            state = tuple(s.detach() for s in state)
            loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            objective = loss if control is None else loss + learn.l0_penalty(model, target_density=args.target_density)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if control is not None:
                control.step()
            step += 1
            if done % 10 == 0 or done == len(windows):
                progress(done, len(windows), f"{name:<11} epoch {epoch + 1}/{args.epochs}", started, loss.item())
        if control is not None:
            control.compact()
        epoch_seconds.append(time.perf_counter() - started)
        valid = bits_per_char(model, data["valid"], args.seq)
        print(f"{name:<11} epoch {epoch + 1}: validation {valid:.3f} bpc, {epoch_seconds[-1]:.1f} s", file=sys.stderr)
        if valid < best[0]:
            best = (valid, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    density = model.rnn.layout.density if hasattr(model.rnn, "layout") else 1.0
    return {"model": name, "width": model.head.in_features, "density": density,
            "parameters": live_parameters(model), "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
            "best_epoch": best[1], "valid_bpc": best[0], "test_bpc": bits_per_char(model, data["test"], args.seq)}


def build(name: str, args, small_world, random_layout) -> CharLM:
    torch.manual_seed(args.seed)
    if name == "dense":
        return dense_model(args)
    if name == "small-world":
        return sparse_model(args, small_world)
    if name == "random":
        return sparse_model(args, random_layout)
    return sparse_model(args, None, gated=True)


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = stdlib_splits()
    data = {"train": streams(raw["train"], args.train_bytes, args.batch),
            "valid": streams(raw["valid"], args.valid_bytes, args.batch),
            "test": streams(raw["test"], args.test_bytes, args.batch)}
    width = args.hidden * args.wide
    n = width // args.block_size
    target = live_parameters(dense_model(args))
    k = matched_graph_degree(args, target)
    small_world = layouts.lstm_gates(layouts.watts_strogatz(n, k, args.rewire, seed=args.seed))
    random_layout = layouts.lstm_gates(layouts.random(n, n, small_world.density, seed=args.seed))
    args.target_density = small_world.density
    print(f"data: {len(raw['train'])} / {len(raw['valid'])} / {len(raw['test'])} bytes of train / validation / test "
          f"source in {sysconfig.get_paths()['stdlib']}; using {data['train'].numel()} / {data['valid'].numel()} / "
          f"{data['test'].numel()}")
    print(f"dense LSTM hidden {args.hidden} ({target} parameters); sparse LSTMs hidden {width} = {n} blocks of "
          f"{args.block_size}, Watts-Strogatz k={k}, p={args.rewire}: recurrent density {small_world.density:.4f}")
    print(f"{torch.get_num_threads()} threads; first use compiles the kernels (announced), numba caches them")
    results = [train(name, build(name, args, small_world, random_layout), args, data) for name in args.models]
    print()
    print(f"{'model':<12}{'hidden':>7}{'density':>9}{'parameters':>12}{'s/epoch':>9}{'best epoch':>11}"
          f"{'valid bpc':>11}{'test bpc':>10}")
    for r in results:
        print(f"{r['model']:<12}{r['width']:>7}{r['density']:>9.4f}{r['parameters']:>12}"
              f"{r['seconds_per_epoch']:>9.1f}{r['best_epoch']:>11}{r['valid_bpc']:>11.3f}{r['test_bpc']:>10.3f}")
    return results


if __name__ == "__main__":
    main()
