"""Ceiling of the CPU matmul kernels: one register tile alone on L1-resident operands.

Times the forward pass's ``8 x 2``-vector tile (:mod:`numbasparse.kernels.cpu.tiles`)
reducing one ``8 x B`` activation panel against ``GROUP`` weight blocks, over and
over, on one thread, for block sizes 32 and 16 (float32).  The gap between this and
the kernels' throughput is what packing and memory traffic cost; the gap between
this and dense MKL on one thread is the code LLVM emits.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from ..kernels.cpu.panels import GROUP, geometry
from ..kernels.cpu.tiles import mma_8x2, mma_16x1, store_8x2, store_16x1, zero_8x2, zero_16x1


@njit(cache=True)
def _sweep_8x2(a, w, out, B, L, reps):
    for _ in range(reps):
        acc = zero_8x2(np.float32(0), 16)
        for e in range(GROUP):
            acc = mma_8x2(acc, a, 0, B, 1, w, e * B * B, B, B, 16)
        store_8x2(acc, out, 0, B, 16)


@njit(cache=True)
def _sweep_16x1(a, w, out, B, L, reps):
    for _ in range(reps):
        acc = zero_16x1(np.float32(0), 16)
        for e in range(GROUP):
            acc = mma_16x1(acc, a, 0, B, 1, w, e * B * B, B, B, 16)
        store_16x1(acc, out, 0, B, 16)


def microkernel_gflops(block_sizes=(32, 16), seconds=0.5, seed=0) -> dict:
    """``{B: GFLOP/s}`` of the forward register tile on one thread (median of 5 runs)."""
    rng = np.random.default_rng(seed)
    result = {}
    for B in block_sizes:
        L, NV, _ = geometry("float32", B)
        if L != 16 or NV not in (1, 2):
            continue
        rows = 8 if NV == 2 else 16
        sweep = _sweep_8x2 if NV == 2 else _sweep_16x1
        a = rng.standard_normal(rows * B).astype(np.float32)
        w = rng.standard_normal(GROUP * B * B).astype(np.float32)
        out = np.empty(rows * B, dtype=np.float32)
        sweep(a, w, out, B, L, 1)
        flops = 2.0 * rows * B * B * GROUP
        reps = max(1, int(seconds * 50e9 / flops / 5))
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            sweep(a, w, out, B, L, reps)
            samples.append(flops * reps / (time.perf_counter() - t0) / 1e9)
        result[B] = float(np.median(samples))
    return result


def format_microkernel(result: dict) -> str:
    lines = ["register tile of the forward pass (float32, 1 thread, L1-resident operands)",
             f"{'block':>6}{'GFLOP/s':>10}"]
    lines += [f"{block:>6}{gflops:>10.1f}" for block, gflops in result.items()]
    return "\n".join(lines)
