"""LSH output-layer rows of the benchmark: :class:`~numbasparse.LSHOutputLayer` against
``nn.Linear`` + cross-entropy over the whole vocabulary, at vocabulary 32768, hidden
512, batch 128 (blocks of 32, 32 or 16 active blocks per row, 16 tables of 10 bits).

Ops: ``train step`` (logits, loss, gradients of the layer and of its input, as the
other rows of the benchmark count a training step), ``+ SGD`` (and the optimizer
step: ``SGD`` on the full layer's dense gradients, on the LSH layer's sparse ones) and
``+ Adam`` (``Adam`` on the full layer, :class:`~numbasparse.RowSparseAdam`, the same
update as ``SparseAdam``, on the LSH layer).  The LSH
rows include hashing the batch, choosing the blocks and rebuilding the tables every 50
steps.  The target: train step at least 4x faster than the full softmax layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn_lsh import LSHOutputLayer, sampled_softmax_loss
from ..row_adam import RowSparseAdam
from .timing import interleaved_ms

OPS = ("train step", "+ SGD", "+ Adam")


def _optimizer(op, params, sparse):
    params = list(params)
    if op == "+ SGD":
        return torch.optim.SGD(params, lr=1e-3)
    if op == "+ Adam":
        return RowSparseAdam(params) if sparse else torch.optim.Adam(params)
    return None


def _full(layer, x, y, optimizer):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        F.cross_entropy(layer(x), y).backward()
        if optimizer is not None:
            optimizer.step()
    return run


def _lsh(layer, x, y, optimizer):
    def run():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        logits, block_ids = layer(x, y)
        sampled_softmax_loss(logits, block_ids, y, layer.block_size).backward()
        if optimizer is not None:
            optimizer.step()
    return run


def lsh_rows(device="cpu", vocab=32768, hidden=512, batch=128, actives=(32, 16), tables=16, bits=10, repeats=5,
             seed=0, progress=None):
    """Rows ``{op, impl, vocab, hidden, batch, active, ms, dense_ms, speedup_vs_dense}``
    (``active``: logits computed per row), per op and number of active blocks, the LSH
    layer and the full layer timed in interleaved rounds."""
    progress = progress or (lambda what: None)
    torch.manual_seed(seed)
    x = torch.randn(batch, hidden, device=device, requires_grad=True)
    y = torch.randint(0, vocab, (batch,), device=device)
    rows = []
    for active in actives:
        for op in OPS:
            full = torch.nn.Linear(hidden, vocab).to(device)
            lsh = LSHOutputLayer(hidden, vocab, 32, active, tables, bits, sparse_grad=True, seed=seed).to(device)
            fns = {"torch nn.Linear + softmax": _full(full, x, y, _optimizer(op, full.parameters(), False)),
                   "numbasparse LSHOutputLayer": _lsh(lsh, x, y, _optimizer(op, lsh.parameters(), True))}
            progress(f"LSH output layer {op}: vocabulary {vocab}, hidden {hidden}, batch {batch}, {active} blocks")
            ms = interleaved_ms(fns, device, repeats)
            dense = ms["torch nn.Linear + softmax"]
            for name, t in ms.items():
                rows.append({"op": op, "impl": name, "vocab": vocab, "hidden": hidden, "batch": batch,
                             "active": active * 32 if name.startswith("numbasparse") else vocab, "ms": t,
                             "dense_ms": dense, "speedup_vs_dense": dense / t})
    return rows


def format_lsh(rows) -> str:
    """Fixed-width table of the LSH rows."""
    legend = ("Output layer over a vocabulary; active: logits computed per row; vs full: the full softmax layer's ms / "
              "this row's ms (same rounds); train step: forward, loss, backward; + SGD / + Adam: and the optimizer "
              "step (RowSparseAdam on the LSH layer)")
    head = f"{'op':<12}{'impl':<28}{'vocab':>7}{'hidden':>7}{'batch':>6}{'active':>8}{'ms':>10}{'vs full':>9}"
    lines = [legend, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:<12}{r['impl']:<28}{r['vocab']:>7}{r['hidden']:>7}{r['batch']:>6}{r['active']:>8}"
                     f"{r['ms']:>10.2f}{r['speedup_vs_dense']:>8.2f}x")
    return "\n".join(lines)
