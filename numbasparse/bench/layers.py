"""Layer- and model-level rows of the benchmark: the fixed cost of a call and a small
mixed model's training step, each against its dense PyTorch twin.

* ``overhead_rows``: a ``256 -> 256`` BlockSparseLinear (block 32, density 0.5, with
  bias) at batch 1, forward and training step, against ``nn.Linear`` of the same
  shape: what a call costs when there is almost no arithmetic (the Python layers,
  autograd, the kernel launch).  Each sample times a loop of calls.
* ``model_rows``: an MLP ``hidden -> hidden -> hidden -> 10`` whose two hidden layers
  are block-sparse, each followed by LayerNorm and GELU, against the same model with
  ``nn.Linear``: a training step (forward, cross-entropy, backward) at batch 64 and a
  forward pass at batch 1.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from .. import layouts
from ..nn import BlockSparseLinear
from .timing import interleaved_ms

__all__ = ["overhead_rows", "model_rows"]

CALLS_PER_SAMPLE = 100


def _row(op, impl, batch, hidden, block, density, ms, dense_ms, flops):
    return {"op": op, "impl": impl, "batch": batch, "hidden": hidden, "block": block, "density": density,
            "ms": ms, "gflops": flops / (ms * 1e6), "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms}


def _looped(fn, calls):
    def run():
        for _ in range(calls):
            fn()
    return run


def _step(model, x, target):
    def run():
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
    return run


def overhead_rows(device="cpu", repeats=5, hidden=256, block=32, density=0.5, progress=None, seed=0):
    """Per-call time of a tiny layer (batch 1), forward and training step, in ms per call."""
    progress = progress or (lambda what: None)
    torch.manual_seed(seed)
    layout = layouts.random(hidden // block, hidden // block, density, seed=seed)
    sparse = BlockSparseLinear(hidden, hidden, layout, block).to(device)
    dense = nn.Linear(hidden, hidden).to(device)
    x = torch.randn(1, hidden, device=device)
    xg = x.clone().requires_grad_()

    def step(layer):
        def run():
            xg.grad = None
            layer.zero_grad(set_to_none=True)
            layer(xg).sum().backward()
        return run

    rows = []
    live = 2.0 * layout.nnz * block * block
    for op, ours, theirs, flops in (("layer fwd", lambda: sparse(x), lambda: dense(x), live),
                                    ("layer train step", step(sparse), step(dense), 3 * live)):
        progress(f"{op:<16} {hidden}x{hidden} batch 1: dense torch, numbasparse")
        ms = interleaved_ms({"dense torch": _looped(theirs, CALLS_PER_SAMPLE),
                             "numbasparse": _looped(ours, CALLS_PER_SAMPLE)}, device, repeats)
        per_call = {impl: t / CALLS_PER_SAMPLE for impl, t in ms.items()}
        rows.append(_row(op, "dense torch", 1, hidden, None, 1.0, per_call["dense torch"], per_call["dense torch"],
                         flops / density))
        rows.append(_row(op, "numbasparse", 1, hidden, block, density, per_call["numbasparse"],
                         per_call["dense torch"], flops))
    return rows


def _mlp(hidden, make_linear):
    return nn.Sequential(make_linear(), nn.LayerNorm(hidden), nn.GELU(),
                         make_linear(), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 10))


def model_rows(device="cpu", repeats=5, hidden=1024, block=32, densities=(0.25, 0.1), batch=64, progress=None,
               seed=0):
    """Training step (batch ``batch``) and batch-1 forward of the mixed MLP, per density."""
    progress = progress or (lambda what: None)
    torch.manual_seed(seed)
    dense = _mlp(hidden, lambda: nn.Linear(hidden, hidden)).to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=gen).to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    x1 = x[:1].contiguous()
    rows, dense_samples = [], {"model train step": [], "model fwd": []}
    for density in densities:
        layout = layouts.random(hidden // block, hidden // block, density, seed=seed)
        sparse = _mlp(hidden, lambda: BlockSparseLinear(hidden, hidden, layout, block)).to(device)
        live = 2.0 * (2 * layout.nnz * block * block + hidden * 10)
        cases = (("model train step", batch, _step(sparse, x, target), _step(dense, x, target), 1, 3 * batch),
                 ("model fwd", 1, _looped(lambda: sparse(x1), 10), _looped(lambda: dense(x1), 10), 10, 1))
        for op, rows_in, ours, theirs, calls, passes in cases:
            progress(f"{op:<16} hidden {hidden} batch {rows_in} density {density}: dense torch, numbasparse")
            grad = torch.enable_grad() if op == "model train step" else torch.no_grad()
            with grad:
                ms = interleaved_ms({"dense torch": theirs, "numbasparse": ours}, device, repeats)
            ms = {impl: t / calls for impl, t in ms.items()}
            dense_samples[op].append(ms["dense torch"])
            rows.append(_row(op, "numbasparse", rows_in, hidden, block, density, ms["numbasparse"],
                             ms["dense torch"], passes * live))
    for op, rows_in, passes in (("model train step", batch, 3 * batch), ("model fwd", 1, 1)):
        if dense_samples[op]:
            median = statistics.median(dense_samples[op])
            rows.insert(0, _row(op, "dense torch", rows_in, hidden, None, 1.0, median, median,
                                passes * 2.0 * (2 * hidden * hidden + hidden * 10)))
    return rows
