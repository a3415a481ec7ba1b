"""numba.cuda kernels of the sampled matmul (see :mod:`numbasparse.kernels.cpu.sampled`
for the shapes, the weight orders "cols" / "rows" and the grouping of pairs by block).

Thread mapping: one thread-block per group (one output block and the pairs that chose
it; ``blockIdx.x`` = group); its ``THREADS`` threads stride over the group's outputs -
``(pair, j)`` for the forward pass, ``(pair, c)`` for the data gradient, ``(j, c)`` for
the weight gradient - and each thread computes its output's whole sum.  Every output
belongs to one thread: no atomics, deterministic results.  float32 and float64.
"""
from __future__ import annotations

import functools

from numba import cuda

__all__ = ["launch", "THREADS"]

THREADS = 128


@cuda.jit(device=True, inline=True)
def _w(w, order_cols, c, col):
    return w[col, c] if order_cols else w[c, col]


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, order: str):
    cols = order == "cols"

    if kind == "forward":
        @cuda.jit
        def forward(x, w, pairs, group_ptr, group_block, y, n_active, block):
            g = cuda.blockIdx.x
            start, stop = group_ptr[g], group_ptr[g + 1]
            base = group_block[g] * block
            for i in range(cuda.threadIdx.x, (stop - start) * block, cuda.blockDim.x):
                p = pairs[start + i // block]
                j = i % block
                n = p // n_active
                s = x[n, 0] * 0
                for c in range(x.shape[1]):
                    s += x[n, c] * _w(w, cols, c, base + j)
                y[p, j] = s
        return forward

    if kind == "data":
        @cuda.jit
        def data(dy, w, pairs, group_ptr, group_block, part, n_active, block):
            g = cuda.blockIdx.x
            start, stop = group_ptr[g], group_ptr[g + 1]
            base = group_block[g] * block
            features = part.shape[1]
            for i in range(cuda.threadIdx.x, (stop - start) * features, cuda.blockDim.x):
                p = pairs[start + i // features]
                c = i % features
                s = dy[p, 0] * 0
                for j in range(block):
                    s += dy[p, j] * _w(w, cols, c, base + j)
                part[p, c] = s
        return data

    @cuda.jit
    def weight(x, dy, pairs, group_ptr, out_block, dw, n_active, block):
        g = cuda.blockIdx.x
        start, stop = group_ptr[g], group_ptr[g + 1]
        base = out_block[g] * block
        features = x.shape[1]
        for i in range(cuda.threadIdx.x, block * features, cuda.blockDim.x):
            j = i // features
            c = i % features
            s = x[0, 0] * 0
            for q in range(start, stop):
                p = pairs[q]
                s += dy[p, j] * x[p // n_active, c]
            if cols:
                dw[base + j, c] = s
            else:
                dw[c, base + j] = s
    return weight


def launch(kind: str, order: str, first, second, pairs, group_ptr, groups, out, n_active: int, block: int,
           stream=0) -> None:
    """Launch kernel ``kind`` ("forward", "data", "weight") for weight order ``order``
    on device arrays (arguments as in :func:`numbasparse.kernels.cpu.sampled.run`)."""
    n_groups = groups.shape[0]
    if n_groups == 0:
        return
    _kernel(kind, order)[n_groups, THREADS, stream](first, second, pairs, group_ptr, groups, out, n_active, block)
