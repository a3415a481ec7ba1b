"""Matmul rows of the benchmark: BlockSparseLinear against dense nn.Linear, PyTorch's
BSR path and masked dense, for forward, data gradient, weight gradient and a full
training step (forward + backward)."""
from __future__ import annotations

import statistics
import warnings

import torch

from .. import backend, layouts
from ..nn import BlockSparseLinear
from .timing import interleaved_ms

OPS = ("fwd", "bwd-data", "bwd-weight", "train step")


def _dense_cases(x, dy, weight, device):
    """Dense nn.Linear equivalents; weight is (out, in) like nn.Linear.weight."""
    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()

    def step():
        xg.grad = wg.grad = None
        torch.nn.functional.linear(xg, wg).backward(dy)

    return {
        "fwd": lambda: torch.nn.functional.linear(x, weight),
        "bwd-data": lambda: dy @ weight,
        "bwd-weight": lambda: dy.t() @ x,
        "train step": step,
    }


def _masked_cases(x, dy, weight, mask, device):
    """What users do today: multiply the dense weight by an element mask, dense matmul."""
    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()

    def step():
        xg.grad = wg.grad = None
        torch.nn.functional.linear(xg, wg * mask).backward(dy)

    return {
        "fwd": lambda: torch.nn.functional.linear(x, weight * mask),
        "bwd-data": lambda: dy @ (weight * mask),
        "bwd-weight": lambda: (dy.t() @ x) * mask,
        "train step": step,
    }


def _bsr_cases(x, dy, masked_weight, block):
    """PyTorch's BSR path: forward and data gradient (it has no weight gradient)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_bsr = masked_weight.to_sparse_bsr((block, block))            # (out, in)
        wt_bsr = masked_weight.t().contiguous().to_sparse_bsr((block, block))  # (in, out)
    return {
        "fwd": lambda: torch.nn.functional.linear(x, w_bsr),
        "bwd-data": lambda: torch.nn.functional.linear(dy, wt_bsr),
    }


def training_step(layer, x, dy):
    """A closure running ``layer`` forward and backward (gradients for x and weight)."""
    xg = x.detach().clone().requires_grad_()

    def step():
        xg.grad = None
        layer.weight.grad = None
        layer(xg).backward(dy)

    return step


def _ours(x, dy, layer):
    layout, bs, w = layer.layout, layer.block_size, layer.weight.detach()
    return {
        # the unchecked entries block_sparse_matmul uses (the public ones add argument checks)
        "fwd": lambda: backend._forward(x, w, layout, bs),
        "bwd-data": lambda: backend._backward(dy, None, w, layout, bs, need_dw=False)[0],
        "bwd-weight": lambda: backend._backward(dy, x, None, layout, bs, need_dx=False)[1],
        "train step": training_step(layer, x, dy),
    }


def matmul_rows(device="cpu", hidden=4096, batches=(32, 256), block_sizes=(8, 16, 32),
                densities=(1.0, 0.5, 0.25, 0.1, 0.03), repeats=5, peers=True, seed=0, progress=None,
                ops=OPS):
    """Time every (batch, block, density) case; returns a list of row dicts with keys
    op, impl, batch, hidden, block, density, ms, gflops, speedup_vs_dense.

    Within a case numbasparse and dense torch are timed in interleaved rounds, then the
    peers (masked dense, torch BSR) with dense torch in rounds of their own; each row's
    speedup is against the dense time of its rounds.  The dense rows report the median
    over all cases of their batch (from numbasparse's rounds).
    """
    progress = progress or (lambda what: None)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        first_row = len(rows)
        x = torch.randn(batch, hidden, generator=gen).to(device)
        dy = torch.randn(batch, hidden, generator=gen).to(device)
        dense_weight = torch.randn(hidden, hidden, generator=gen).to(device) / hidden ** 0.5
        dense = _dense_cases(x, dy, dense_weight, device)
        dense_samples = {op: [] for op in ops}
        for block in block_sizes:
            for density in densities:
                layout = layouts.random(hidden // block, hidden // block, density, seed=seed)
                live = layout.nnz * block * block
                layer = BlockSparseLinear(hidden, hidden, layout, block, bias=False).to(device)
                cases = {"numbasparse": _ours(x, dy, layer)}
                if peers:
                    mask = _element_mask(layout, block, device)     # (out, in)
                    masked = layer.to_dense().detach().t().contiguous()  # (out, in)
                    cases["masked dense"] = _masked_cases(x, dy, masked, mask, device)
                    if layout.nnz:
                        cases["torch BSR"] = _bsr_cases(x, dy, masked, block)
                for op in ops:
                    peer_fns = {impl: impl_ops[op] for impl, impl_ops in cases.items()
                                if impl != "numbasparse" and op in impl_ops}
                    progress(f"{op:<11} batch {batch} block {block} density {density}: "
                             f"{', '.join(['dense torch', 'numbasparse', *peer_fns])}")
                    # peers in rounds of their own: a peer that allocates a dense weight per
                    # call (masked dense) would otherwise slow down its neighbours' timings
                    ms = interleaved_ms({"dense torch": dense[op], "numbasparse": cases["numbasparse"][op]},
                                        device, repeats)
                    dense_samples[op].append(ms["dense torch"])
                    flops = _flops(op, batch, hidden, live)
                    rows.append(_row(op, "numbasparse", batch, hidden, block, density, ms["numbasparse"],
                                     ms["dense torch"], flops))
                    if peer_fns:
                        peer_ms = interleaved_ms({"dense torch": dense[op], **peer_fns}, device, repeats)
                        for impl in peer_fns:
                            rows.append(_row(op, impl, batch, hidden, block, density, peer_ms[impl],
                                             peer_ms["dense torch"], flops))
        rows[first_row:first_row] = [
            _row(op, "dense torch", batch, hidden, None, 1.0, statistics.median(dense_samples[op]),
                 statistics.median(dense_samples[op]), _flops(op, batch, hidden, hidden * hidden))
            for op in ops if dense_samples[op]]
    return rows


def _flops(op, batch, hidden, live_weights):
    per_matmul = 2.0 * batch * live_weights
    return 3 * per_matmul if op == "train step" else per_matmul


def _element_mask(layout, block, device):
    mask = torch.from_numpy(layout.mask).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return mask.t().contiguous().to(device=device, dtype=torch.float32)


def _row(op, impl, batch, hidden, block, density, ms, dense_ms, flops):
    return {"op": op, "impl": impl, "batch": batch, "hidden": hidden, "block": block, "density": density,
            "ms": ms, "gflops": flops / (ms * 1e6), "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms}
