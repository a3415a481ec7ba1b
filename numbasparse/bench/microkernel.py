"""Ceiling of the CPU kernels: the 4x4 dot micro-kernel alone on cache-resident panels.

Times ``dot4x4`` over a ``(64, L)`` and a ``(32, L)`` panel (every 4x4 output tile
of the ``64 x 32`` result), one thread, for several reduction lengths L.  The gap
between this and the kernels' throughput is what packing, gathering and memory
traffic cost; the gap between this and dense MKL is the code LLVM emits.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit

from ..kernels.cpu.microkernel import FASTMATH, dot4x4


@njit(fastmath=FASTMATH, cache=True)
def _sweep(a, b, out, length, reps):
    for _ in range(reps):
        for r in range(0, a.shape[0], 4):
            for c in range(0, b.shape[0], 4):
                dot4x4(a, r, 0, b, c, 0, length, out, r, c, False)


def microkernel_gflops(lengths=(128, 256, 512, 1024, 2048), seconds=0.5, seed=0) -> dict:
    """``{L: GFLOP/s}`` of the micro-kernel on one thread (median of 5 runs)."""
    rng = np.random.default_rng(seed)
    result = {}
    for length in lengths:
        a = rng.standard_normal((64, length)).astype(np.float32)
        b = rng.standard_normal((32, length)).astype(np.float32)
        out = np.empty((64, 32), dtype=np.float32)
        _sweep(a, b, out, length, 1)
        flops = 2.0 * 64 * 32 * length
        reps = max(1, int(seconds * 50e9 / flops / 5))
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            _sweep(a, b, out, length, reps)
            samples.append(flops * reps / (time.perf_counter() - t0) / 1e9)
        result[length] = float(np.median(samples))
    return result


def format_microkernel(result: dict) -> str:
    lines = ["micro-kernel (1 thread, cache-resident panels)", f"{'L':>6}{'GFLOP/s':>10}"]
    lines += [f"{length:>6}{gflops:>10.1f}" for length, gflops in result.items()]
    return "\n".join(lines)
