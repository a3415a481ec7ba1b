"""numba.cuda block-sparse matmul kernels: forward, data gradient and weight gradient.

Block size ``B`` is one of 8, 16, 32; dtypes float32, float64 and float16 (float16
is staged and accumulated in float32, rounded once when the output is written).  ``x`` is ``(N, C)``
with ``C = in_blocks * B``; ``w`` is ``(capacity, B, B)``; ``y`` is ``(N, K)`` with
``K = out_blocks * B``.  Live entry ``e`` of a :class:`~numbasparse.layout.BlockLayout`
is block ``(i, j)`` stored in slot ``s``::

    y[:, jB:(j+1)B]  = sum over live (i, j, s) of x[:, iB:(i+1)B] @ w[s]
    dx[:, iB:(i+1)B] = sum over live (i, j, s) of dy[:, jB:(j+1)B] @ w[s].T
    dw[s]            = x[:, iB:(i+1)B].T @ dy[:, jB:(j+1)B]          (live slots only)

Design (same for every kernel): every thread-block owns a distinct output tile and
loops over the live blocks that feed it, so there are no atomics and the results are
deterministic (bit-identical from run to run).  Operands are staged through shared
memory; every thread keeps a small register tile of accumulators.  A thread-block has
``_THREADS = 64`` threads viewed as an ``_TY x _TX = 8 x 8`` grid
(``tx = threadIdx.x % 8``, ``ty = threadIdx.x // 8``).

Every grid is one-dimensional (``gridDim.y`` / ``.z`` stop at 65535, which a layout
with more block columns would exceed); each kernel decomposes ``blockIdx.x`` itself.

Kernels are built lazily per ``(B, dtype)`` by small factories (shared-array shapes
must be compile-time constants, so they are closure constants of each factory) and
cached.  They accept anything a numba.cuda kernel accepts (numba device arrays,
``cuda.as_cuda_array`` views, objects exposing ``__cuda_array_interface__``; numpy
arrays under the CUDA simulator).

Two entries per kernel:

* ``forward`` / ``backward_data`` / ``backward_weight`` (public, checked): shapes,
  dtypes, block size and every value of the layout tables are checked before the
  launch.  Device tables are copied to the host for that, which synchronizes on
  ``stream``: the checked entry is the slower one.
* ``_forward`` / ``_backward_data`` / ``_backward_weight`` (private, unchecked): for
  callers whose arguments are valid by construction (:mod:`numbasparse.backend`,
  whose tables come from a :class:`~numbasparse.layout.BlockLayout` and whose tensors
  were checked against it).  They launch on ``stream`` and never synchronize the host.
"""
from __future__ import annotations

import functools

from numba import cuda

from .host import (check_entry_tables, check_floats, check_grouped_tables, compute_type, dtype_of, flat_grid, host_in,
                   shape_of)

__all__ = ["forward", "backward_data", "backward_weight", "BLOCK_SIZES", "ROW_TILE", "THREADS"]

BLOCK_SIZES = (8, 16, 32)

_TX = 8              # thread-grid columns
_TY = 8              # thread-grid rows
_THREADS = _TX * _TY  # threads per thread-block (all kernels)
_TN = 32             # rows of x / y per thread-block in forward / backward_data
_TNW = 32            # rows of x / dy staged per step in backward_weight

THREADS = _THREADS
ROW_TILE = _TN


# --------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=None)
def _gather_kernel(B: int, dtype_str: str, transpose: bool):
    """Kernel computing ``out[:, jB:(j+1)B] = sum_e a[:, idx[e]B:(idx[e]+1)B] @ W_e``.

    ``W_e = w[slots[e]]`` (forward, ``transpose=False``) or ``w[slots[e]].T``
    (backward_data, ``transpose=True``), ``e`` over ``ptr[j]:ptr[j+1]``.
    """
    AT = compute_type(dtype_str)
    BP = B + 1                 # padded shared row length: conflict-free column reads / transposed writes
    TN = _TN
    TX = _TX
    TY = _TY
    NT = _THREADS
    TM = _TN // _TY            # output rows per thread (4)
    TC = B // _TX              # output columns per thread (1, 2, 4 for B = 8, 16, 32)
    A_ITEMS = (TN * B + NT - 1) // NT   # a-tile elements each thread loads per live block
    W_ITEMS = (B * B + NT - 1) // NT    # w-block elements each thread loads per live block
    A_SIZE = TN * B
    W_SIZE = B * B
    TRANSPOSE = transpose

    # Thread/data mapping.
    #   grid = (tiles * out_blocks,) with tiles = ceil(N / TN) (see _gather_grid);
    #   blockIdx.x = j * tiles + row tile: output block column j = blockIdx.x // tiles,
    #   rows n0 = (blockIdx.x % tiles) * TN .. n0+TN-1 (row tiles of one column run
    #   next to each other and share its weight blocks).  The thread-block owns
    #   out[n0:n0+TN, jB:(j+1)B] and nothing else writes it.
    #   Thread (ty, tx) accumulates, in registers acc[r, c], the TM x TC outputs
    #       out[n0 + ty + r*TY, jB + tx + c*TX]   for r < TM, c < TC
    #   (rows strided by TY, columns strided by TX: a warp reads consecutive w_s
    #   columns and at most 4 distinct a_s rows per step, broadcast to the rest).
    #   For every live block e of column j (the loop trip count is uniform across the
    #   thread-block, so every thread reaches every syncthreads):
    #     shared a_s[TN, B+1] = a[n0:n0+TN, idx[e]B:(idx[e]+1)B] (zeros for rows >= N),
    #             loaded cooperatively: element l = t + q*NT -> (l // B, l % B), so
    #             consecutive threads read consecutive global addresses;
    #     shared w_s[B, B+1]  = W_e, w_s[k, c] multiplies input column k into output
    #             column c (for transpose, w[s][r, c] is stored at w_s[c, r]);
    #     then each thread does TM*TC FMAs per k for TM + TC shared loads.
    @cuda.jit
    def kernel(a, w, ptr, idx, slots, out):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        n_rows = a.shape[0]
        tiles = (n_rows + TN - 1) // TN
        j = cuda.blockIdx.x // tiles
        n0 = (cuda.blockIdx.x - j * tiles) * TN
        a_s = cuda.shared.array((TN, BP), AT)
        w_s = cuda.shared.array((B, BP), AT)
        acc = cuda.local.array((TM, TC), AT)
        wv = cuda.local.array(TC, AT)
        for r in range(TM):
            for c in range(TC):
                acc[r, c] = 0
        start = ptr[j]
        stop = ptr[j + 1]
        for e in range(start, stop):
            col0 = idx[e] * B
            s = slots[e]
            for q in range(A_ITEMS):
                l = t + q * NT
                if l < A_SIZE:
                    r = l // B
                    k = l - r * B
                    n = n0 + r
                    if n < n_rows:
                        a_s[r, k] = a[n, col0 + k]
                    else:
                        a_s[r, k] = 0
            for q in range(W_ITEMS):
                l = t + q * NT
                if l < W_SIZE:
                    r = l // B
                    c = l - r * B
                    if TRANSPOSE:
                        w_s[c, r] = w[s, r, c]
                    else:
                        w_s[r, c] = w[s, r, c]
            cuda.syncthreads()
            for k in range(B):
                for c in range(TC):
                    wv[c] = w_s[k, tx + c * TX]
                for r in range(TM):
                    av = a_s[ty + r * TY, k]
                    for c in range(TC):
                        acc[r, c] += av * wv[c]
            cuda.syncthreads()  # before the next live block overwrites a_s / w_s
        o0 = j * B
        for r in range(TM):
            n = n0 + ty + r * TY
            if n < n_rows:
                for c in range(TC):
                    out[n, o0 + tx + c * TX] = acc[r, c]

    return kernel


@functools.lru_cache(maxsize=None)
def _weight_kernel(B: int, dtype_str: str):
    """Kernel computing ``dw[s] = x[:, iB:(i+1)B].T @ dy[:, jB:(j+1)B]`` per live entry."""
    AT = compute_type(dtype_str)
    TN = _TNW
    TX = _TX
    TY = _TY
    NT = _THREADS
    TA = B // _TY              # dw rows per thread (1, 2, 4)
    TB = B // _TX              # dw columns per thread (1, 2, 4)
    ITEMS = (TN * B + NT - 1) // NT
    SIZE = TN * B

    # Thread/data mapping.
    #   grid = (nnz,) (see _weight_grid); blockIdx.x = live entry e = (i, j, s).  The
    #   thread-block owns dw[s] (B x B) and nothing else writes it; dead slots are never
    #   touched.
    #   Thread (ty, tx) accumulates, in registers acc[a, b], the TA x TB outputs
    #       dw[s, ty + a*TY, tx + b*TX]   for a < TA, b < TB.
    #   The thread-block walks N in chunks of TN rows (uniform trip count, so every
    #   thread reaches every syncthreads):
    #     shared x_s[TN, B]  = x [n0:n0+TN, iB:(i+1)B]  (zeros for rows >= N)
    #     shared d_s[TN, B]  = dy[n0:n0+TN, jB:(j+1)B]  (zeros for rows >= N)
    #     loaded cooperatively, element l = t + q*NT -> (l // B, l % B) (coalesced);
    #     then for each staged row n: TA + TB shared loads, TA*TB FMAs per thread.
    @cuda.jit
    def kernel(x, dy, erows, ecols, eslots, dw):
        t = cuda.threadIdx.x
        tx = t % TX
        ty = t // TX
        e = cuda.blockIdx.x
        i0 = erows[e] * B
        j0 = ecols[e] * B
        s = eslots[e]
        n_rows = x.shape[0]
        x_s = cuda.shared.array((TN, B), AT)
        d_s = cuda.shared.array((TN, B), AT)
        acc = cuda.local.array((TA, TB), AT)
        xv = cuda.local.array(TA, AT)
        dv = cuda.local.array(TB, AT)
        for a_ in range(TA):
            for b_ in range(TB):
                acc[a_, b_] = 0
        for n0 in range(0, n_rows, TN):
            for q in range(ITEMS):
                l = t + q * NT
                if l < SIZE:
                    r = l // B
                    k = l - r * B
                    n = n0 + r
                    if n < n_rows:
                        x_s[r, k] = x[n, i0 + k]
                        d_s[r, k] = dy[n, j0 + k]
                    else:
                        x_s[r, k] = 0
                        d_s[r, k] = 0
            cuda.syncthreads()
            rows = min(TN, n_rows - n0)  # same for every thread of the block
            for r in range(rows):
                for a_ in range(TA):
                    xv[a_] = x_s[r, ty + a_ * TY]
                for b_ in range(TB):
                    dv[b_] = d_s[r, tx + b_ * TX]
                for a_ in range(TA):
                    for b_ in range(TB):
                        acc[a_, b_] += xv[a_] * dv[b_]
            cuda.syncthreads()  # before the next chunk overwrites x_s / d_s
        for a_ in range(TA):
            for b_ in range(TB):
                dw[s, ty + a_ * TY, tx + b_ * TX] = acc[a_, b_]

    return kernel


# ---------------------------------------------------------------------- grids
def _gather_grid(n_rows: int, groups: int) -> tuple:
    """1-D grid of the gather kernel: ``ceil(n_rows / ROW_TILE)`` row tiles for each of
    ``groups`` output block columns (forward) or block rows (data gradient)."""
    return flat_grid((n_rows + _TN - 1) // _TN, groups)


def _weight_grid(nnz: int) -> tuple:
    """1-D grid of the weight-gradient kernel: one thread-block per live entry."""
    return flat_grid(nnz)


# ------------------------------------------------------------ unchecked launches
def _launch_gather(a, w, ptr, idx, slots, B, out, stream, transpose):
    grid = _gather_grid(a.shape[0], ptr.shape[0] - 1)
    if grid[0] == 0:
        return
    kernel = _gather_kernel(B, dtype_of(a).str, transpose)
    kernel[grid, _THREADS, stream](host_in(a), host_in(w), host_in(ptr), host_in(idx), host_in(slots), out)


def _forward(x, w, col_ptr, col_rows, col_slots, block_size, y, stream=0):
    """Unchecked :func:`forward`: the arguments must already fit each other."""
    _launch_gather(x, w, col_ptr, col_rows, col_slots, block_size, y, stream, False)


def _backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, dx, stream=0):
    """Unchecked :func:`backward_data`: the arguments must already fit each other."""
    _launch_gather(dy, w, row_ptr, row_cols, row_slots, block_size, dx, stream, True)


def _backward_weight(x, dy, entry_rows, entry_cols, entry_slots, block_size, dw, stream=0):
    """Unchecked :func:`backward_weight`: the arguments must already fit each other."""
    if x.shape[0] == 0:
        return
    grid = _weight_grid(entry_rows.shape[0])
    if grid[0] == 0:
        return
    kernel = _weight_kernel(block_size, dtype_of(x).str)
    kernel[grid, _THREADS, stream](host_in(x), host_in(dy), host_in(entry_rows), host_in(entry_cols),
                                   host_in(entry_slots), dw)


# ------------------------------------------------------------------- checked API
def _check_operands(block_size, arrays):
    """``(B, shapes)`` after checking the block size, the dtypes, the ranks (weights
    3-D ``(capacity, B, B)``, activations 2-D ``(N, multiple of B)``) and equal row
    counts of the activations."""
    ranks = {name: 3 if name in ("w", "dw") else 2 for name in arrays}
    check_floats(block_size, BLOCK_SIZES, arrays, ranks)
    B = int(block_size)
    shapes = {name: shape_of(name, a) for name, a in arrays.items()}
    rows = None
    for name, shape in shapes.items():
        if ranks[name] == 3:
            if shape[1:] != (B, B):
                raise ValueError(f"{name} must have shape (capacity, {B}, {B}), got {shape}")
            continue
        if shape[1] % B:
            raise ValueError(f"{name} has {shape[1]} features, not a multiple of block_size {B}")
        if rows is None:
            rows = (name, shape[0])
        elif shape[0] != rows[1]:
            raise ValueError(f"row mismatch: {rows[0]} has {rows[1]} rows, {name} has {shape[0]}")
    return B, shapes


def forward(x, w, col_ptr, col_rows, col_slots, block_size, y, stream=0):
    """``y (N, K) = x (N, C) @ W`` for the block-sparse ``W (capacity, B, B)`` given by
    the by-column tables (``col_ptr`` of length ``K/B + 1``, ``col_rows < C/B``,
    ``col_slots < capacity``).

    Checks everything first (device tables are copied to the host for that).  Writes
    every element of ``y`` (exact zeros in block columns without live blocks); no
    launch when ``N == 0`` or there are no output blocks.
    """
    B, shapes = _check_operands(block_size, {"x": x, "w": w, "y": y})
    check_grouped_tables("col", col_ptr, col_rows, col_slots, shapes["y"][1] // B, shapes["x"][1] // B,
                         shapes["w"][0], stream)
    _forward(x, w, col_ptr, col_rows, col_slots, B, y, stream)


def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, dx, stream=0):
    """``dx (N, C) = dy (N, K) @ W.T`` for the block-sparse ``W`` given by the by-row
    tables (``row_ptr`` of length ``C/B + 1``, ``row_cols < K/B``, ``row_slots < capacity``).

    Checks everything first (device tables are copied to the host for that).  Writes
    every element of ``dx`` (exact zeros in block rows without live blocks); no launch
    when ``N == 0`` or there are no input blocks.
    """
    B, shapes = _check_operands(block_size, {"dy": dy, "w": w, "dx": dx})
    check_grouped_tables("row", row_ptr, row_cols, row_slots, shapes["dx"][1] // B, shapes["dy"][1] // B,
                         shapes["w"][0], stream)
    _backward_data(dy, w, row_ptr, row_cols, row_slots, B, dx, stream)


def backward_weight(x, dy, entry_rows, entry_cols, entry_slots, block_size, dw, stream=0):
    """``dw[s] = x[:, iB:(i+1)B].T @ dy[:, jB:(j+1)B]`` for every live entry ``(i, j, s)``
    (``entry_rows < C/B``, ``entry_cols < K/B``, ``entry_slots < dw.shape[0]``, no slot
    twice: one thread-block writes each entry's slot).

    Checks everything first (device tables are copied to the host for that).
    Overwrites the live slots of ``dw``; dead slots are never touched (the caller
    pre-zeroes ``dw``).  No launch when ``N == 0`` or ``nnz == 0``.
    """
    B, shapes = _check_operands(block_size, {"x": x, "dy": dy, "dw": dw})
    check_entry_tables(entry_rows, entry_cols, entry_slots, shapes["x"][1] // B, shapes["dy"][1] // B,
                       shapes["dw"][0], stream)
    _backward_weight(x, dy, entry_rows, entry_cols, entry_slots, B, dw, stream)
