"""Next-word prediction over the Python standard library's source with an LSH output
layer, against the same model with a full ``nn.Linear`` + softmax, at equal training
time.

Data: the ``*.py`` files of the running Python's standard library at the top level and
one directory down, test directories left out (``sysconfig.get_paths()["stdlib"]``; no
download).  Split by file, fixed: ``zlib.crc32(relative path) % 10`` is 0 for test, 1
for validation, else training.  Tokens: identifiers, numbers and single punctuation
characters (``[A-Za-z_][A-Za-z0-9_]*|\\d+|[^\\s\\w]``); the vocabulary is the
``--vocab - 1`` most frequent training tokens plus ``<unk>``.  An epoch is one pass
over the first ``--train-tokens`` training tokens.

Model: the previous ``--context`` tokens, embedded (64 each) and concatenated ->
``Linear`` -> ReLU -> ``--hidden`` features -> output layer over the vocabulary:

* ``full``: ``nn.Linear(hidden, vocab)`` and cross-entropy over every word;
* ``lsh``: :class:`numbasparse.LSHOutputLayer` (blocks of 32 words; the label's block
  always among the row's) and :func:`numbasparse.sampled_softmax_loss` over the chosen
  blocks, its weights trained by :class:`numbasparse.RowSparseAdam` (the update of
  ``torch.optim.SparseAdam``) on sparse gradients: only the chosen rows move.

Both train for the same wall-clock time (``--seconds`` each), Adam on the rest at one
learning rate.  Then, on held-out test tokens, both are scored with the full softmax:
top-1 accuracy and perplexity; for the LSH layer also how often its hashed choice
holds the block of the highest logit and the label's block.

    python examples/lsh_next_word.py            # full run (see BENCHMARKS.md)
    python examples/lsh_next_word.py --quick    # under a minute
"""
from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import sys
import sysconfig
import time
import zlib

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numbasparse  # noqa: E402

TOKEN = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\s\w]")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768,
                   help="vocabulary size (a multiple of 32, >= 20000 for the study)")
    p.add_argument("--hidden", type=int, default=512, help="features into the output layer")
    p.add_argument("--context", type=int, default=4, help="previous tokens the model sees")
    p.add_argument("--batch", type=int, default=128, help="rows per training step")
    p.add_argument("--seconds", type=float, default=300.0, help="training time of each model")
    p.add_argument("--train-tokens", type=int, default=500_000, help="training tokens per epoch")
    p.add_argument("--eval-tokens", type=int, default=50_000, help="held-out test tokens scored")
    p.add_argument("--active-blocks", type=int, default=16, help="LSH layer: blocks of 32 words per row")
    p.add_argument("--tables", type=int, default=16, help="LSH layer: hash tables")
    p.add_argument("--bits", type=int, default=10, help="LSH layer: bits per table")
    p.add_argument("--rehash-every", type=int, default=50, help="LSH layer: training steps between rehashes")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of both models")
    p.add_argument("--models", nargs="+", default=["full", "lsh"], choices=("full", "lsh"))
    p.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="vocabulary 4096, hidden 128, 10 s per model, 50k training and 5k test tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.seconds = min(args.vocab, 4096), min(args.hidden, 128), min(args.seconds, 10.0)
        args.train_tokens, args.eval_tokens = min(args.train_tokens, 50_000), min(args.eval_tokens, 5_000)
        args.active_blocks, args.bits = min(args.active_blocks, 8), min(args.bits, 6)
    if args.vocab % 32:
        p.error("--vocab must be a multiple of 32 (the LSH layer's block size)")
    return args


# ----------------------------------------------------------------------------- data
def stdlib_tokens() -> dict:
    """``{"train": [...], "valid": [...], "test": [...]}``: the tokens of each split."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    splits = {"train": [], "valid": [], "test": []}
    for path in paths:
        relative = os.path.relpath(path, root)
        if "test" in relative or "site-packages" in relative:
            continue
        bucket = zlib.crc32(relative.encode()) % 10
        with open(path, "rb") as f:
            tokens = TOKEN.findall(f.read())
        splits["test" if bucket == 0 else "valid" if bucket == 1 else "train"].extend(tokens)
    return splits


def encode(tokens, index: dict) -> torch.Tensor:
    unk = len(index)
    return torch.tensor([index.get(t, unk) for t in tokens], dtype=torch.int64)


def windows(ids: torch.Tensor, context: int):
    """``(inputs (M, context), targets (M,))`` of every position with a full context."""
    inputs = ids.unfold(0, context, 1)[:-1]
    return inputs, ids[context:]


# ----------------------------------------------------------------------------- model
class Trunk(nn.Module):
    def __init__(self, vocab: int, context: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.mix = nn.Linear(64 * context, hidden)

    def forward(self, ids):
        return F.relu(self.mix(self.embed(ids).flatten(1)))


def build(kind: str, args):
    torch.manual_seed(args.seed)
    trunk = Trunk(args.vocab, args.context, args.hidden)
    if kind == "full":
        head = nn.Linear(args.hidden, args.vocab)
        optimizers = [torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=args.lr)]
    else:
        head = numbasparse.LSHOutputLayer(args.hidden, args.vocab, block_size=32, active_blocks=args.active_blocks,
                                          tables=args.tables, bits=args.bits, rehash_every=args.rehash_every,
                                          sparse_grad=True, seed=args.seed)
        optimizers = [torch.optim.Adam(trunk.parameters(), lr=args.lr),
                      numbasparse.RowSparseAdam(head.parameters(), lr=args.lr)]
    return trunk, head, optimizers


def loss_of(kind: str, trunk, head, x, y):
    h = trunk(x)
    if kind == "full":
        return F.cross_entropy(head(h), y)
    logits, block_ids = head(h, y)
    return numbasparse.sampled_softmax_loss(logits, block_ids, y, 32)


@torch.no_grad()
def evaluate(kind: str, trunk, head, x, y, batch: int = 1024) -> dict:
    trunk.eval()
    head.eval()
    nll = correct = 0.0
    recall = collections.Counter()
    for start in range(0, len(y), batch):
        h = trunk(x[start:start + batch])
        logits = head(h) if kind == "full" else head.full_logits(h)
        nll += F.cross_entropy(logits, y[start:start + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[start:start + batch]).sum().item()
        if kind == "lsh":
            r = head.recall(h, y[start:start + batch])
            n = len(y[start:start + batch])
            recall.update({"top_block": r["top_block"] * n, "label_block": r["label_block"] * n})
            chance = r["chance"]
    trunk.train()
    head.train()
    result = {"accuracy": 100.0 * correct / len(y), "perplexity": math.exp(nll / len(y))}
    if kind == "lsh":
        result.update({k: v / len(y) for k, v in recall.items()}, chance=chance)
    return result


def train(kind: str, args, data: dict) -> dict:
    trunk, head, optimizers = build(kind, args)
    x, y = data["train"]
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=gen)
    steps_per_epoch = len(y) // args.batch
    steps = position = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        if position + args.batch > len(y):
            order, position = torch.randperm(len(y), generator=gen), 0
        rows = order[position:position + args.batch]
        position += args.batch
        loss = loss_of(kind, trunk, head, x[rows], y[rows])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        steps += 1
        if steps % 20 == 0:
            elapsed = time.perf_counter() - started
            done = min(1.0, elapsed / args.seconds)
            print(f"\r{kind:<5}[{'#' * int(30 * done):<30}] {elapsed:5.0f}/{args.seconds:.0f} s, step {steps}, "
                  f"loss {loss.item():.3f}", end="", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    print(file=sys.stderr)
    result = {"model": kind, "steps": steps, "epochs": steps / steps_per_epoch, "ms_per_step": 1e3 * seconds / steps,
              "seconds_per_epoch": seconds / steps * steps_per_epoch}
    result.update(evaluate(kind, trunk, head, *data["test"]))
    return result


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = stdlib_tokens()
    counts = collections.Counter(splits["train"])
    index = {t: i for i, (t, _) in enumerate(counts.most_common(args.vocab - 1))}
    data = {}
    for name, limit in (("train", args.train_tokens), ("test", args.eval_tokens)):
        data[name] = windows(encode(splits[name][:limit + args.context], index), args.context)
    covered = sum(counts[t] for t in index) / max(1, sum(counts.values()))
    print(f"{sum(len(s) for s in splits.values())} tokens ({len(splits['train'])} training, {len(counts)} distinct); "
          f"vocabulary {args.vocab} covers {100 * covered:.1f}% of the training tokens; "
          f"{len(data['train'][1])} training and {len(data['test'][1])} test positions")
    print(f"{torch.get_num_threads()} threads, {args.seconds:.0f} s of training per model")
    results = [train(kind, args, data) for kind in args.models]
    print()
    print(f"{'model':<6}{'steps':>7}{'epochs':>8}{'ms/step':>9}{'s/epoch':>9}{'top-1 %':>9}{'perplexity':>12}"
          f"{'top-block recall':>18}{'label recall':>14}")
    for r in results:
        recall = (f"{r['top_block']:>18.3f}{r['label_block']:>14.3f}" if "top_block" in r else f"{'-':>18}{'-':>14}")
        print(f"{r['model']:<6}{r['steps']:>7}{r['epochs']:>8.2f}{r['ms_per_step']:>9.1f}{r['seconds_per_epoch']:>9.1f}"
              f"{r['accuracy']:>9.2f}{r['perplexity']:>12.1f}{recall}")
    if any("chance" in r for r in results):
        print(f"chance of holding a given block: {next(r['chance'] for r in results if 'chance' in r):.3f}")
    return results


if __name__ == "__main__":
    main()
