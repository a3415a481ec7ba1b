"""Convolution rows of the benchmark: BlockSparseConv2d against dense
``torch.nn.functional.conv2d`` and a masked dense weight, for forward, data gradient,
weight gradient and a full training step (forward + backward)."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from .. import layouts
from ..conv import _conv_backward_data, _conv_backward_weight, _conv_forward, conv_geometry
from ..nn_conv import BlockSparseConv2d
from .matmul import training_step
from .timing import interleaved_ms

__all__ = ["conv_rows"]

OPS = ("conv fwd", "conv bwd-data", "conv bwd-weight", "conv train step")
KERNEL = 3
PADDING = 1


def _dense_cases(x, dy, weight, mask=None):
    """Dense conv2d with weight (out, in, kh, kw); with ``mask``, the weight is masked
    first (what masked-weight pruning does)."""
    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()
    masked = (lambda w: w * mask) if mask is not None else (lambda w: w)
    grad_mask = mask if mask is not None else 1.0

    def step():
        xg.grad = wg.grad = None
        F.conv2d(xg, masked(wg), padding=PADDING).backward(dy)

    return {
        "conv fwd": lambda: F.conv2d(x, masked(weight), padding=PADDING),
        "conv bwd-data": lambda: torch.nn.grad.conv2d_input(x.shape, masked(weight), dy, padding=PADDING),
        "conv bwd-weight": lambda: torch.nn.grad.conv2d_weight(x, weight.shape, dy, padding=PADDING) * grad_mask,
        "conv train step": step,
    }


def _ours(x, dy, layer):
    layout, bs, w = layer.layout, layer.block_size, layer.weight.detach()
    geometry = conv_geometry(tuple(x.shape[2:]), layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return {
        "conv fwd": lambda: _conv_forward(x, w, layout, bs, geometry),
        "conv bwd-data": lambda: _conv_backward_data(dy, w, layout, bs, geometry, tuple(x.shape[2:])),
        "conv bwd-weight": lambda: _conv_backward_weight(x, dy, tuple(w.shape), layout, bs, geometry),
        "conv train step": training_step(layer, x, dy),
    }


def _flops(op, batch, size, live_weights):
    per_pass = 2.0 * batch * size * size * live_weights   # stride 1, 'same'-sized output
    return 3 * per_pass if op == "conv train step" else per_pass


def _row(op, impl, batch, channels, block, density, ms, dense_ms, flops):
    return {"op": op, "impl": impl, "batch": batch, "channels": channels, "block": block, "density": density,
            "ms": ms, "gflops": flops / (ms * 1e6), "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms}


def conv_rows(device="cpu", repeats=5, block_sizes=(16, 32), densities=(1.0, 0.5, 0.25, 0.1, 0.03), batch=8,
              channels=256, size=32, progress=None, seed=0):
    """Time a ``channels -> channels`` 3x3 convolution (padding 1) on ``batch`` images of
    ``size x size`` pixels for every (block size, density), float32.

    Returns a list of row dicts with keys op ("conv fwd", "conv bwd-data",
    "conv bwd-weight", "conv train step"), impl ("numbasparse", "dense torch",
    "masked dense"), batch, channels, block, density, ms (median), gflops (effective:
    live blocks only, ``2 * N * Ho * Wo * nnz * B^2 * kh * kw`` per pass, three passes
    for a training step) and speedup_vs_dense (dense torch time / this time).
    ``progress`` is called with a description before each measurement.  numbasparse
    and masked dense are each timed in interleaved rounds with dense torch; each
    speedup is against the dense time of the same rounds.
    """
    progress = progress or (lambda what: None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    dy = torch.randn(batch, channels, size, size, generator=gen).to(device)
    dense_weight = (torch.randn(channels, channels, KERNEL, KERNEL, generator=gen)
                    / (channels * KERNEL * KERNEL) ** 0.5).to(device)
    rows = []
    dense = _dense_cases(x, dy, dense_weight)
    dense_samples = {op: [] for op in OPS}
    for block in block_sizes:
        for density in densities:
            blocks = channels // block
            layout = layouts.random(blocks, blocks, density, seed=seed)
            live = layout.nnz * block * block * KERNEL * KERNEL
            layer = BlockSparseConv2d(channels, channels, KERNEL, layout, block, padding=PADDING, bias=False).to(device)
            mask = torch.from_numpy(layout.mask.T).repeat_interleave(block, 0).repeat_interleave(block, 1)
            mask = mask[:, :, None, None].to(device=device, dtype=dense_weight.dtype)   # (out, in, 1, 1)
            ours = _ours(x, dy, layer)
            masked = _dense_cases(x, dy, layer.to_dense().detach(), mask)
            for op in OPS:
                progress(f"{op:<16} block {block} density {density}: dense torch, numbasparse, masked dense")
                ms = interleaved_ms({"dense torch": dense[op], "numbasparse": ours[op]}, device, repeats)
                dense_samples[op].append(ms["dense torch"])
                rows.append(_row(op, "numbasparse", batch, channels, block, density, ms["numbasparse"],
                                 ms["dense torch"], _flops(op, batch, size, live)))
                peer = interleaved_ms({"dense torch": dense[op], "masked dense": masked[op]}, device, repeats)
                rows.append(_row(op, "masked dense", batch, channels, block, density, peer["masked dense"],
                                 peer["dense torch"], _flops(op, batch, size, live)))
    dense_rows = [_row(op, "dense torch", batch, channels, None, 1.0, statistics.median(dense_samples[op]),
                       statistics.median(dense_samples[op]), _flops(op, batch, size, channels * channels * KERNEL * KERNEL))
                  for op in OPS if dense_samples[op]]
    return dense_rows + rows
