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

Threading: forward/data run a few prange workers per thread (handed out
dynamically), each with its own scratch panel and a contiguous run of tasks (a block
column and a tile of rows); the weight gradient runs a prange over live blocks.
Every task owns its outputs, so there are no atomics and the result does not depend
on the thread count.
"""
import threading

import numpy as np
from numba import njit, prange, uint64

from .microkernel import FASTMATH as _FASTMATH
from .microkernel import dot4x4 as _dot4x4
from .scheduling import dynamic_schedule, max_workers

ROW_TILE = 64      # rows of x per forward/data task
K_CHUNK = 1024     # reduction chunk of forward/data (4 panel rows stay in L1)
N_CHUNK = 64       # reduction chunk of the weight gradient (a block's panels stay in L1)


@njit(parallel=True, cache=True)
def _pack_weights(w, ptr, slots, bs, transpose_w, packed):
    """Lay the weights of every group out as one contiguous panel, once per call.

    Group g (an output block column for forward, an input block row for data) owns
    ``packed[ptr[g]*bs*bs : ptr[g+1]*bs*bs]`` viewed as a C-contiguous
    ``(bs, m_g*bs)`` panel: row ``c`` is the reduction vector of the group's output
    column ``c``, its live blocks side by side (``w[s][:, c]`` for forward,
    ``w[s][c, :]`` for data).  Each block is transposed while it sits in L1.
    """
    groups = ptr.shape[0] - 1
    for g in prange(groups):
        m = ptr[g + 1] - ptr[g]
        panel = packed[ptr[g] * bs * bs: ptr[g + 1] * bs * bs].reshape((bs, m * bs))
        for q in range(m):
            block = w[slots[ptr[g] + q]]
            if transpose_w:
                for c in range(bs):
                    for t in range(bs):
                        panel[c, q * bs + t] = block[t, c]
            else:
                for c in range(bs):
                    for t in range(bs):
                        panel[c, q * bs + t] = block[c, t]


@njit(fastmath=_FASTMATH, cache=True)
def _group_tile(a, n0, rows, ptr, other, packed, group, bs, a_panel, tile, out):
    """One forward/data task: ``out[n0:n0+rows, group*bs:(group+1)*bs]``.

    ``a`` is x (forward) or dy (data); the group's live blocks are
    ``other[ptr[group]:ptr[group+1]]``; its weight panel is in ``packed``.  The rows
    of ``a`` are gathered into ``a_panel`` (the worker's scratch; rows past ``rows``
    hold stale values whose results are discarded), then 4x4 output tiles are
    reduced over the panels in chunks of K_CHUNK columns.
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
    w_panel = packed[start * bs * bs: (start + m) * bs * bs].reshape((bs, length))
    ubs = uint64(bs)
    for r in range(rows):
        src = a[n0 + r]
        dst = a_panel[r]
        for q in range(m):
            # unsigned offsets: no negative-index checks, so the copy vectorizes
            s0 = uint64(other[start + q]) * ubs
            d0 = uint64(q) * ubs
            for t in range(ubs):
                dst[d0 + t] = src[s0 + t]
    for k0 in range(0, length, K_CHUNK):
        chunk = min(length, k0 + K_CHUNK) - k0
        for r in range(0, padded, 4):
            for c in range(0, bs, 4):
                _dot4x4(a_panel, r, k0, w_panel, c, k0, chunk, tile, r, c, k0 > 0)
    for r in range(rows):
        for c in range(bs):
            out[n0 + r, col0 + c] = tile[r, c]


@njit(parallel=True, cache=True)
def _grouped(a, w, ptr, other, slots, bs, transpose_w, workers, longest, packed, scratch, out):
    """Forward/data: ``longest`` is the widest group's panel length (max m_g * bs)."""
    _pack_weights(w, ptr, slots, bs, transpose_w, packed)
    n = a.shape[0]
    groups = ptr.shape[0] - 1
    row_tiles = (n + ROW_TILE - 1) // ROW_TILE
    tasks = groups * row_tiles
    # One worker per thread, each with its own scratch panel and a contiguous run of
    # tasks in group-major order, so consecutive tasks reuse a weight panel from L2.
    for worker in prange(workers):
        base = worker * (ROW_TILE * longest + ROW_TILE * bs)
        a_panel = scratch[base: base + ROW_TILE * longest].reshape((ROW_TILE, longest))
        tile = scratch[base + ROW_TILE * longest: base + ROW_TILE * (longest + bs)].reshape((ROW_TILE, bs))
        for task in range(worker * tasks // workers, (worker + 1) * tasks // workers):
            group = task // row_tiles
            n0 = (task % row_tiles) * ROW_TILE
            rows = min(n, n0 + ROW_TILE) - n0
            _group_tile(a, n0, rows, ptr, other, packed, group, bs, a_panel, tile, out)


def _run_grouped(a, w, ptr, other, slots, block_size, transpose_w, out):
    ptr = np.asarray(ptr)
    groups = ptr.shape[0] - 1
    tasks = groups * -(-a.shape[0] // ROW_TILE)
    workers = max(1, min(max_workers(), tasks))
    longest = max(int(np.diff(ptr).max(initial=0)) * block_size, 1)
    packed = _scratch("packed", int(ptr[-1]) * block_size * block_size, a.dtype)
    scratch = _scratch("panels", workers * ROW_TILE * (longest + block_size), a.dtype)
    with dynamic_schedule():
        _grouped(a, w, ptr, other, slots, block_size, transpose_w, workers, longest, packed, scratch, out)


_local = threading.local()


def _scratch(name, size, dtype):
    """A reusable 1-D scratch array of at least ``size`` elements, per Python thread
    (fresh pages on every call would cost a page fault per 4 KiB)."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (name, np.dtype(dtype).str)
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1), dtype=dtype)
        buffers[key] = buf
    return buf


def forward(x, w, col_ptr, col_rows, col_slots, block_size, y):
    """y (N, K) = x (N, C) @ W; every element of y is written."""
    if x.shape[0] == 0:
        return
    _run_grouped(x, w, col_ptr, col_rows, col_slots, block_size, True, y)


def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, dx):
    """dx (N, C) = dy (N, K) @ W^T; every element of dx is written."""
    if dy.shape[0] == 0:
        return
    _run_grouped(dy, w, row_ptr, row_cols, row_slots, block_size, False, dx)


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
