"""Block-sparse matmul kernels for CPUs (numba.njit, parallel).

Shapes: ``x (N, C)``, ``dy``/``y (N, K)``, ``w (capacity, B, B)`` with ``C = in_blocks*B``
and ``K = out_blocks*B``; block ``w[s]`` of live entry ``(i, j)`` maps
``x[:, iB:(i+1)B]`` into ``y[:, jB:(j+1)B]``.  All arrays C-contiguous, same dtype.

Design (the same for the three kernels): every output element is a dot product
over a *reduction panel*.  The kernel packs both operands of the dot products into
contiguous panels (rows = outputs, columns = reduction index) and runs a 4x4
register-blocked micro-kernel over them: 16 accumulators, each a SIMD register after
LLVM vectorizes the reduction loop, 8 loads per 16 FMAs.

* forward:  y[n, jB+c]  = sum over live i of  x[n, iB:(i+1)B] . w[s][:, c]
            panel rows: x rows of the tile (live blocks of column j side by side) and
            the columns c of w[s] (packed transposed).
* data:     dx[n, iB+k] = sum over live j of dy[n, jB:(j+1)B] . w[s][k, :]
* weight:   dw[s][k, c] = x[:, iB+k] . dy[:, jB+c]   (x and dy transposed once).

Threading: forward/data run one prange worker per thread, each with its own scratch
panel, taking every workers-th task (a block column and a tile of rows); the weight
gradient runs a prange over live blocks.  Every task owns its outputs, so there are
no atomics and the result does not depend on the thread count.
"""
import numpy as np
import numba
from numba import njit, prange

from .microkernel import FASTMATH as _FASTMATH
from .microkernel import dot4x4 as _dot4x4

ROW_TILE = 64      # rows of x per forward/data task
K_CHUNK = 1024     # reduction chunk of forward/data (4 panel rows stay in L1)
N_CHUNK = 64       # reduction chunk of the weight gradient (a block's panels stay in L1)


@njit(parallel=True, cache=True)
def _pack_weights(w, ptr, slots, bs, transpose_w):
    """Weights of every group laid out as contiguous panel rows, one pass per call.

    ``packed`` is ``(bs, nnz*bs)``; group g (an output block column for forward, an
    input block row for data) owns columns ``ptr[g]*bs : ptr[g+1]*bs``.  Row ``c`` of
    that panel is the reduction vector of the group's output column ``c``, its live
    blocks side by side (``w[s][:, c]`` for forward, ``w[s][c, :]`` for data).
    """
    total = ptr[ptr.shape[0] - 1]
    packed = np.empty((bs, total * bs), dtype=w.dtype)
    for c in prange(bs):
        for e in range(total):
            s = slots[e]
            if transpose_w:
                for t in range(bs):
                    packed[c, e * bs + t] = w[s, t, c]
            else:
                for t in range(bs):
                    packed[c, e * bs + t] = w[s, c, t]
    return packed


@njit(fastmath=_FASTMATH, cache=True)
def _group_tile(a, n0, rows, ptr, other, packed, group, bs, a_panel, tile, out):
    """One forward/data task: ``out[n0:n0+rows, group*bs:(group+1)*bs]``.

    ``a`` is x (forward) or dy (data); the group's live blocks are
    ``other[ptr[group]:ptr[group+1]]``; its weight panel is in ``packed``.  The rows
    of ``a`` are gathered into ``a_panel`` (the worker's scratch; rows past ``rows``
    hold stale values whose results are discarded), then 4x4 output tiles are
    reduced over the panel in chunks of K_CHUNK columns.
    """
    start = ptr[group]
    m = ptr[group + 1] - start
    col0 = group * bs
    if m == 0:
        for r in range(rows):
            for c in range(bs):
                out[n0 + r, col0 + c] = 0
        return
    length = m * bs
    padded = (rows + 3) // 4 * 4
    for q in range(m):
        blk = other[start + q]
        for r in range(rows):
            for t in range(bs):
                a_panel[r, q * bs + t] = a[n0 + r, blk * bs + t]
    for k0 in range(0, length, K_CHUNK):
        chunk = min(length, k0 + K_CHUNK) - k0
        for r in range(0, padded, 4):
            for c in range(0, bs, 4):
                _dot4x4(a_panel, r, k0, packed, c, start * bs + k0, chunk, tile, r, c, k0 > 0)
    for r in range(rows):
        for c in range(bs):
            out[n0 + r, col0 + c] = tile[r, c]


@njit(parallel=True, cache=True)
def _grouped(a, w, ptr, other, slots, bs, transpose_w, threads, out):
    packed = _pack_weights(w, ptr, slots, bs, transpose_w)
    n = a.shape[0]
    groups = ptr.shape[0] - 1
    row_tiles = (n + ROW_TILE - 1) // ROW_TILE
    tasks = groups * row_tiles
    longest = 0
    for g in range(groups):
        longest = max(longest, (ptr[g + 1] - ptr[g]) * bs)
    # One worker per thread, each with its own scratch, taking every workers-th task.
    workers = max(1, min(threads, tasks))
    for worker in prange(workers):
        a_panel = np.empty((ROW_TILE, max(longest, 1)), dtype=a.dtype)
        tile = np.empty((ROW_TILE, bs), dtype=a.dtype)
        for task in range(worker, tasks, workers):
            group = task // row_tiles
            n0 = (task % row_tiles) * ROW_TILE
            rows = min(n, n0 + ROW_TILE) - n0
            _group_tile(a, n0, rows, ptr, other, packed, group, bs, a_panel, tile, out)


def forward(x, w, col_ptr, col_rows, col_slots, block_size, y):
    """y (N, K) = x (N, C) @ W; every element of y is written."""
    if x.shape[0] == 0:
        return
    _grouped(x, w, col_ptr, col_rows, col_slots, block_size, True, numba.get_num_threads(), y)


def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, dx):
    """dx (N, C) = dy (N, K) @ W^T; every element of dx is written."""
    if dy.shape[0] == 0:
        return
    _grouped(dy, w, row_ptr, row_cols, row_slots, block_size, False, numba.get_num_threads(), dx)


@njit(parallel=True, cache=True)
def _transpose(a, out):
    rows, cols = a.shape
    for c0 in prange((cols + 31) // 32):
        for r in range(rows):
            for c in range(c0 * 32, min(cols, c0 * 32 + 32)):
                out[c, r] = a[r, c]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _weight_grad(xt, dyt, entry_rows, entry_cols, entry_slots, bs, dw):
    n = xt.shape[1]
    for e in prange(entry_rows.shape[0]):
        i = entry_rows[e]
        j = entry_cols[e]
        s = entry_slots[e]
        block = dw[s]
        for n0 in range(0, n, N_CHUNK):
            length = min(n, n0 + N_CHUNK) - n0
            for k in range(0, bs, 4):
                for c in range(0, bs, 4):
                    _dot4x4(xt, i * bs + k, n0, dyt, j * bs + c, n0, length, block, k, c, n0 > 0)


def backward_weight(x, dy, entry_rows, entry_cols, entry_slots, block_size, dw):
    """dw[s] = x[:, iB:(i+1)B]^T @ dy[:, jB:(j+1)B] at live slots; dead slots untouched."""
    if entry_rows.shape[0] == 0:
        return
    if x.shape[0] == 0:
        dw[np.asarray(entry_slots)] = 0
        return
    xt = np.empty((x.shape[1], x.shape[0]), dtype=x.dtype)
    dyt = np.empty((dy.shape[1], dy.shape[0]), dtype=dy.dtype)
    _transpose(x, xt)
    _transpose(dy, dyt)
    _weight_grad(xt, dyt, entry_rows, entry_cols, entry_slots, block_size, dw)
