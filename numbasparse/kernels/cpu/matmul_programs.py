"""The block-sparse matmul programs for CPUs: forward, and data + weight gradient.

Shapes (one dtype, float32 or float64): ``x (N, C)``, ``y``/``dy (N, K)``, blocks
``w (capacity, B, B)`` with ``C = in_blocks*B``, ``K = out_blocks*B``; block ``w[s]``
of live entry ``(i, j)`` maps ``x[:, iB:(i+1)B]`` into ``y[:, jB:(j+1)B]``.  Arrays
reach a program flattened (1-D, C order) through its argument block (:mod:`.args`).

Each program is built per ``(dtype, B)`` by a factory (shapes of register tiles and
vector widths are compile-time constants) and compiled once (numba's cache).

Work split: a program's tasks are numbered; every thread takes the next number from
an atomic counter (:mod:`.runtime`).  Packing tasks come first; a thread that draws a
compute task waits until all packing tasks are finished.  Every compute task owns its
outputs and reduces in a fixed order, so results are bit-identical for any thread
count.

Packed layouts (``NCp`` rows per chunk, a multiple of the tile height; rows past
``N`` are zeros, so every tile is full and padded rows contribute nothing):

* ``xp``  panel ``(chunk, i)``: ``x[rows, iB:(i+1)B]``, row-major ``NCp x B``;
* ``dyp`` panel ``(chunk, j)``: ``dy[rows, jB:(j+1)B]``, row-major ``NCp x B``;
* ``dyt`` panel ``(chunk, j)``: the same block transposed, ``B x NCp``.

How threads map to data:

* forward, task ``(chunk, j)``: ``y[rows of chunk, jB:(j+1)B]``.  Register tiles of
  rows x output columns (``8x2`` vectors, or ``16x1`` for one-vector blocks) sweep
  the chunk; the live blocks of column ``j`` are taken ``GROUP`` at a time, so a
  group's weight blocks stay in L1 while the whole chunk streams past them, and the
  partial sums wait in a per-thread tile between groups.
* data gradient, task ``(chunk, i)``: ``dx[rows, iB:(i+1)B]``, computed transposed
  (``8 x 2`` tiles of input features x rows: weight rows broadcast, ``dyt`` rows as
  vectors), so no weight is ever transposed; written back transposed at the end.
* weight gradient, task = live entry ``(i, j, s)``: ``dw[s]``, tiles of input
  features x output columns reduced over all rows (``xp`` down a column, ``dyp``
  rows as vectors) without leaving registers.
* direct programs (fewer than ``DIRECT_ROWS`` rows: nothing to pack): the same tasks
  on unpacked rows, one row at a time (the forward pass at batch 1 streams each
  weight block once).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, njit, types

from . import VECTOR_BYTES
from .args import JOINED, NEXT_TASK, PACKED, array_arg, scalar_arg
from .simd import atomic_load, fetch_add, prefetch, vadd, vfma, vload, vstore, vsum, vzero
from .tiles import (transpose_tile, load_8x2, load_16x1, mma_1x1, mma_1x2, mma_8x1, mma_8x2, mma_16x1, rows_8x2, rows_16x1,
                    store_8x1, store_8x2, store_16x1, zero_8x1, zero_8x2, zero_16x1)

GROUP = 4          # live blocks whose weights a tile sweep keeps in L1
PREFETCH_BLOCKS = 4  # direct forward: weight blocks requested this far ahead of use
DIRECT_ROWS = 16   # fewer rows than this: direct (unpacked) programs
MAX_CHUNK = 256    # rows per packed chunk, at most

_SIGNATURE = types.void(types.voidptr)


def geometry(dtype, B):
    """``(L, NV, VL)``: lanes per vector of a block row, vectors per block row, lanes
    of a full vector."""
    VL = VECTOR_BYTES // np.dtype(dtype).itemsize
    L = min(B, VL)
    return L, B // L, VL


def row_multiple(dtype) -> int:
    """Packed chunks hold a multiple of this many rows (the tallest tile's height)."""
    return max(16, 2 * (VECTOR_BYTES // np.dtype(dtype).itemsize))


# ------------------------------------------------------------------- helpers

@njit(inline="always", cache=True)
def _pack_rows(a, ap, ch, blk, N, width, NCp, B, L, NV, zero):
    """Panel (ch, blk) of ``ap`` = rows ``ch*NCp ..`` of ``a[:, blk*B:(blk+1)*B]`` (zeros past N)."""
    n0 = ch * NCp
    nblocks = width // B
    dst = (ch * nblocks + blk) * NCp * B
    valid = min(N - n0, NCp)
    for r in range(valid):
        src = (n0 + r) * width + blk * B
        for v in range(NV):
            vstore(ap, dst + r * B + v * L, vload(a, src + v * L, L))
    z = vzero(zero, L)
    for r in range(valid, NCp):
        for v in range(NV):
            vstore(ap, dst + r * B + v * L, z)


@njit(inline="always", cache=True)
def _pack_transposed(a, at, ch, blk, N, width, NCp, B, RV, VL, zero):
    """Panel (ch, blk) of ``at``: rows ``ch*NCp ..`` of ``a[:, blk*B:(blk+1)*B]``
    transposed, as ``NCp/RV`` sub-panels of ``B x RV`` (row ``c`` = feature c of RV
    consecutive rows), so that a register tile reads one contiguous sub-panel.
    ``VL x VL`` squares go through registers (``VL`` divides ``RV``, and ``B`` when
    ``B >= VL``); rows past ``N`` are zeros."""
    n0 = ch * NCp
    nblocks = width // B
    dst = (ch * nblocks + blk) * B * NCp
    valid = min(N - n0, NCp)
    for r0 in range(0, NCp, VL):
        sub = dst + (r0 // RV) * B * RV + r0 % RV
        if B >= VL and r0 + VL <= valid:
            for c0 in range(0, B, VL):
                transpose_tile(a, (n0 + r0) * width + blk * B + c0, width, at, sub + c0 * RV, RV, VL)
        else:
            for r in range(r0, r0 + VL):
                for c in range(B):
                    at[sub + r - r0 + c * RV] = a[(n0 + r) * width + blk * B + c] if r < valid else zero


@njit(inline="always", cache=True)
def _unpack_transposed(tile, out, row0, col0, width, first, last, B, RV, VL):
    """Inverse of :func:`_pack_transposed` for rows ``first <= r < last`` of one
    ``B x NCp`` tile of sub-panels: ``out[(row0 + r)*width + col0 + c] = tile[(r, c)]``."""
    for r0 in range(first, last, VL):
        sub = (r0 // RV) * B * RV + r0 % RV
        if B >= VL and r0 + VL <= last:
            for c0 in range(0, B, VL):
                transpose_tile(tile, sub + c0 * RV, RV, out, (row0 + r0) * width + col0 + c0, width, VL)
        else:
            for r in range(r0, min(r0 + VL, last)):
                for c in range(B):
                    out[(row0 + r) * width + col0 + c] = tile[sub + r - r0 + c * RV]


@njit(inline="always", cache=True)
def _prefetch_part(w, slots, e_begin, e_end, part, parts, BB, LINE):
    """Prefetch (into L2) part ``part`` of ``parts`` of the weight blocks
    ``w[slots[e]]``, ``e_begin <= e < e_end``: a tile sweep spreads the next group's
    weights over its steps instead of stalling on them when the group starts."""
    lines = (e_end - e_begin) * (BB // LINE)
    first = part * lines // parts
    last = (part + 1) * lines // parts
    per_block = BB // LINE
    for q in range(first, last):
        prefetch(w, slots[e_begin + q // per_block] * BB + (q % per_block) * LINE, 2)


@njit(inline="always", cache=True)
def _copy_rows(src, s0, ld_src, dst, d0, ld_dst, rows, B, L, NV):
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld_dst + v * L, vload(src, s0 + r * ld_src + v * L, L))


@njit(inline="always", cache=True)
def _fill_rows(dst, d0, ld, rows, B, L, NV, src, s0, use_src, zero):
    """``rows`` rows of ``B`` values at ``dst[d0 + r*ld]``: ``src[s0:s0+B]`` if
    ``use_src``, else zeros."""
    z = vzero(zero, L)
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld + v * L, vload(src, s0 + v * L, L) if use_src else z)


@njit(inline="always", cache=True)
def _zero_rows(dst, d0, ld, rows, B, L, NV, zero):
    z = vzero(zero, L)
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld + v * L, z)


# --------------------------------------------------------------------- forward
@functools.lru_cache(maxsize=None)
def forward_program(dtype_name: str, B: int, packed: bool):
    """``y = x @ W (+ bias)``.  Arrays: x, w, col_ptr, col_rows, col_slots, y, xp,
    tiles, bias (length K, or anything when has_bias is 0).
    Scalars: N, C, K, NCp, n_chunks, threads, has_bias, run (direct program: output
    block columns a thread takes at a time, so each streams a long run of weights)."""
    DT = np.dtype(dtype_name).type
    L, NV, _ = geometry(dtype_name, B)
    BB = B * B
    HALVES = max(1, NV // 2)      # column groups of two vectors (NV = 4 has two)
    MR = 16 if NV == 1 else 8     # rows per register tile
    LINE = 64 // np.dtype(dtype_name).itemsize
    NA = 9

    if packed:
        @cfunc(_SIGNATURE, cache=True)
        def program(data):
            block = carray(data, (32,), dtype=np.int64)
            x = array_arg(block, 0, DT)
            w = array_arg(block, 1, DT)
            ptr = array_arg(block, 2, np.int32)
            rows = array_arg(block, 3, np.int32)
            slots = array_arg(block, 4, np.int32)
            y = array_arg(block, 5, DT)
            xp = array_arg(block, 6, DT)
            tiles = array_arg(block, 7, DT)
            bias = array_arg(block, 8, DT)
            N = scalar_arg(block, NA, 0)
            C = scalar_arg(block, NA, 1)
            K = scalar_arg(block, NA, 2)
            NCp = scalar_arg(block, NA, 3)
            n_chunks = scalar_arg(block, NA, 4)
            threads = scalar_arg(block, NA, 5)
            has_bias = scalar_arg(block, NA, 6)
            me = fetch_add(block, JOINED, 1)
            if me >= threads:
                return
            tile = tiles[me * NCp * B:(me + 1) * NCp * B]
            nbi = C // B
            nbo = K // B
            n_pack = n_chunks * nbi
            n_tasks = n_pack + n_chunks * nbo
            t = fetch_add(block, NEXT_TASK, 1)
            while t < n_tasks:
                if t < n_pack:
                    _pack_rows(x, xp, t // nbi, t % nbi, N, C, NCp, B, L, NV, DT(0))
                    fetch_add(block, PACKED, 1)
                else:
                    while atomic_load(block, PACKED) < n_pack:
                        pass
                    u = t - n_pack
                    ch = u // nbo
                    j = u - ch * nbo
                    n0 = ch * NCp
                    valid = min(N - n0, NCp)
                    e_beg = ptr[j]
                    e_end = ptr[j + 1]
                    if e_beg == e_end:
                        _fill_rows(y, n0 * K + j * B, K, valid, B, L, NV, bias, j * B, has_bias, DT(0))
                    else:
                        for half in range(HALVES):
                            coff = half * 2 * L
                            e0 = e_beg
                            while e0 < e_end:
                                e1 = min(e0 + GROUP, e_end)
                                e2 = min(e1 + GROUP, e_end)
                                for r in range(0, NCp, MR):
                                    if half == 0:
                                        _prefetch_part(w, slots, e1, e2, r // MR, NCp // MR, BB, LINE)
                                    if NV == 1:
                                        if e0 != e_beg:
                                            acc = load_16x1(tile, r * B, B, L)
                                        elif has_bias:
                                            acc = rows_16x1(bias, j * B, L)
                                        else:
                                            acc = zero_16x1(DT(0), L)
                                        for e in range(e0, e1):
                                            acc = mma_16x1(acc, xp, ((ch * nbi + rows[e]) * NCp + r) * B, B, 1,
                                                           w, slots[e] * BB, B, B, L)
                                        if e1 == e_end and r + MR <= valid:
                                            store_16x1(acc, y, (n0 + r) * K + j * B, K, L)
                                        else:
                                            store_16x1(acc, tile, r * B, B, L)
                                    else:
                                        if e0 != e_beg:
                                            acc = load_8x2(tile, r * B + coff, B, L)
                                        elif has_bias:
                                            acc = rows_8x2(bias, j * B + coff, L)
                                        else:
                                            acc = zero_8x2(DT(0), L)
                                        for e in range(e0, e1):
                                            acc = mma_8x2(acc, xp, ((ch * nbi + rows[e]) * NCp + r) * B, B, 1,
                                                          w, slots[e] * BB + coff, B, B, L)
                                        if e1 == e_end and r + MR <= valid:
                                            store_8x2(acc, y, (n0 + r) * K + j * B + coff, K, L)
                                        else:
                                            store_8x2(acc, tile, r * B + coff, B, L)
                                e0 = e1
                        # rows of a partly valid last tile went through the tile
                        tail = valid // MR * MR
                        _copy_rows(tile, tail * B, B, y, (n0 + tail) * K + j * B, K, valid - tail, B, L, NV)
                t = fetch_add(block, NEXT_TASK, 1)
    else:
        @cfunc(_SIGNATURE, cache=True)
        def program(data):
            block = carray(data, (32,), dtype=np.int64)
            x = array_arg(block, 0, DT)
            w = array_arg(block, 1, DT)
            ptr = array_arg(block, 2, np.int32)
            rows = array_arg(block, 3, np.int32)
            slots = array_arg(block, 4, np.int32)
            y = array_arg(block, 5, DT)
            bias = array_arg(block, 8, DT)
            N = scalar_arg(block, NA, 0)
            C = scalar_arg(block, NA, 1)
            K = scalar_arg(block, NA, 2)
            has_bias = scalar_arg(block, NA, 6)
            run = scalar_arg(block, NA, 7)
            nbo = K // B
            t = fetch_add(block, NEXT_TASK, run)
            while t < nbo:
                for j in range(t, min(t + run, nbo)):
                    for n in range(N):
                        for half in range(HALVES):
                            coff = half * 2 * L
                            c0 = vzero(DT(0), L)
                            c1 = c0
                            if has_bias:
                                c0 = vload(bias, j * B + coff, L)
                                if NV > 1:
                                    c1 = vload(bias, j * B + coff + L, L)
                            for e in range(ptr[j], ptr[j + 1]):
                                if n == 0 and half == 0 and e + PREFETCH_BLOCKS < ptr[j + 1]:
                                    ahead = slots[e + PREFETCH_BLOCKS] * BB
                                    for q in range(0, BB, LINE):
                                        prefetch(w, ahead + q, 2)
                                if NV == 1:
                                    c0, c1 = mma_1x1(c0, c1, x, n * C + rows[e] * B, 1, w, slots[e] * BB, B, B, L)
                                else:
                                    c0, c1 = mma_1x2(c0, c1, x, n * C + rows[e] * B, 1, w, slots[e] * BB + coff,
                                                     B, B, L)
                            if NV == 1:
                                vstore(y, n * K + j * B, vadd(c0, c1))
                            else:
                                vstore(y, n * K + j * B + coff, c0)
                                vstore(y, n * K + j * B + coff + L, c1)
                t = fetch_add(block, NEXT_TASK, run)
    return program


# -------------------------------------------------------------------- backward
@functools.lru_cache(maxsize=None)
def backward_program(dtype_name: str, B: int, packed: bool):
    """``dx = dy @ W.T`` and/or ``dw[s] = x_i.T @ dy_j`` (live slots).

    Arrays: x, dy, w, row_ptr, row_cols, row_slots, entry_rows, entry_cols,
    entry_slots, dx, dw, xp, dyp, dyt, tiles.  Scalars: N, C, K, NCp, n_chunks,
    threads, want_dx, want_dw.
    """
    DT = np.dtype(dtype_name).type
    L, NV, VL = geometry(dtype_name, B)
    BB = B * B
    HALVES = max(1, NV // 2)
    WIDE = NV == 1 and B >= 16     # one-vector rows, 16 of them: 16x1 weight-gradient tiles
    LINE = 64 // np.dtype(dtype_name).itemsize
    NA = 15

    if packed:
        @cfunc(_SIGNATURE, cache=True)
        def program(data):
            block = carray(data, (48,), dtype=np.int64)
            x = array_arg(block, 0, DT)
            dy = array_arg(block, 1, DT)
            w = array_arg(block, 2, DT)
            row_ptr = array_arg(block, 3, np.int32)
            row_cols = array_arg(block, 4, np.int32)
            row_slots = array_arg(block, 5, np.int32)
            entry_rows = array_arg(block, 6, np.int32)
            entry_cols = array_arg(block, 7, np.int32)
            entry_slots = array_arg(block, 8, np.int32)
            dx = array_arg(block, 9, DT)
            dw = array_arg(block, 10, DT)
            xp = array_arg(block, 11, DT)
            dyp = array_arg(block, 12, DT)
            dyt = array_arg(block, 13, DT)
            tiles = array_arg(block, 14, DT)
            N = scalar_arg(block, NA, 0)
            C = scalar_arg(block, NA, 1)
            K = scalar_arg(block, NA, 2)
            NCp = scalar_arg(block, NA, 3)
            n_chunks = scalar_arg(block, NA, 4)
            threads = scalar_arg(block, NA, 5)
            want_dx = scalar_arg(block, NA, 6)
            want_dw = scalar_arg(block, NA, 7)
            me = fetch_add(block, JOINED, 1)
            if me >= threads:
                return
            tile = tiles[me * NCp * B:(me + 1) * NCp * B]
            nbi = C // B
            nbo = K // B
            n_xp = n_chunks * nbi if want_dw else 0
            n_dyp = n_chunks * nbo if want_dw else 0
            n_dyt = n_chunks * nbo if want_dx else 0
            n_pack = n_xp + n_dyp + n_dyt
            n_dx = n_chunks * nbi if want_dx else 0
            n_dw = entry_rows.shape[0] if want_dw else 0
            n_tasks = n_pack + n_dx + n_dw
            t = fetch_add(block, NEXT_TASK, 1)
            while t < n_tasks:
                if t < n_pack:
                    if t < n_xp:
                        _pack_rows(x, xp, t // nbi, t % nbi, N, C, NCp, B, L, NV, DT(0))
                    elif t < n_xp + n_dyp:
                        u = t - n_xp
                        _pack_rows(dy, dyp, u // nbo, u % nbo, N, K, NCp, B, L, NV, DT(0))
                    else:
                        u = t - n_xp - n_dyp
                        _pack_transposed(dy, dyt, u // nbo, u % nbo, N, K, NCp, B, 2 * VL, VL, DT(0))
                    fetch_add(block, PACKED, 1)
                else:
                    while atomic_load(block, PACKED) < n_pack:
                        pass
                    u = t - n_pack
                    if u < n_dx:
                        ch = u // nbi
                        i = u - ch * nbi
                        n0 = ch * NCp
                        valid = min(N - n0, NCp)
                        e_beg = row_ptr[i]
                        e_end = row_ptr[i + 1]
                        if e_beg == e_end:
                            _zero_rows(dx, n0 * C + i * B, C, valid, B, L, NV, DT(0))
                        else:
                            RV = 2 * VL
                            e0 = e_beg
                            while e0 < e_end:
                                e1 = min(e0 + GROUP, e_end)
                                e2 = min(e1 + GROUP, e_end)
                                for q in range(NCp // RV):
                                    _prefetch_part(w, row_slots, e1, e2, q, NCp // RV, BB, LINE)
                                    for kk in range(0, B, 8):
                                        t0 = (q * B + kk) * RV
                                        if e0 == e_beg:
                                            acc = zero_8x2(DT(0), VL)
                                        else:
                                            acc = load_8x2(tile, t0, RV, VL)
                                        for e in range(e0, e1):
                                            acc = mma_8x2(acc, w, row_slots[e] * BB + kk * B, B, 1,
                                                          dyt, ((ch * nbo + row_cols[e]) * NCp + q * RV) * B, RV,
                                                          B, VL)
                                        store_8x2(acc, tile, t0, RV, VL)
                                    if e1 == e_end:   # sub-panel q is final: out while it is in L1
                                        _unpack_transposed(tile, dx, n0, i * B, C, q * RV, min(valid, q * RV + RV),
                                                           B, RV, VL)
                                e0 = e1
                    else:
                        e = u - n_dx
                        i = entry_rows[e]
                        j = entry_cols[e]
                        out = entry_slots[e] * BB
                        if WIDE:
                            acc16 = zero_16x1(DT(0), L)
                            for ch in range(n_chunks):
                                acc16 = mma_16x1(acc16, xp, (ch * nbi + i) * NCp * B, 1, B,
                                                 dyp, (ch * nbo + j) * NCp * B, B, NCp, L)
                            store_16x1(acc16, dw, out, B, L)
                        elif NV == 1:
                            acc8 = zero_8x1(DT(0), L)
                            for ch in range(n_chunks):
                                acc8 = mma_8x1(acc8, xp, (ch * nbi + i) * NCp * B, 1, B,
                                               dyp, (ch * nbo + j) * NCp * B, B, NCp, L)
                            store_8x1(acc8, dw, out, B, L)
                        else:
                            for kk in range(0, B, 8):
                                for half in range(HALVES):
                                    coff = half * 2 * L
                                    acc = zero_8x2(DT(0), L)
                                    for ch in range(n_chunks):
                                        acc = mma_8x2(acc, xp, (ch * nbi + i) * NCp * B + kk, 1, B,
                                                      dyp, (ch * nbo + j) * NCp * B + coff, B, NCp, L)
                                    store_8x2(acc, dw, out + kk * B + coff, B, L)
                t = fetch_add(block, NEXT_TASK, 1)
    else:
        @cfunc(_SIGNATURE, cache=True)
        def program(data):
            block = carray(data, (48,), dtype=np.int64)
            x = array_arg(block, 0, DT)
            dy = array_arg(block, 1, DT)
            w = array_arg(block, 2, DT)
            row_ptr = array_arg(block, 3, np.int32)
            row_cols = array_arg(block, 4, np.int32)
            row_slots = array_arg(block, 5, np.int32)
            entry_rows = array_arg(block, 6, np.int32)
            entry_cols = array_arg(block, 7, np.int32)
            entry_slots = array_arg(block, 8, np.int32)
            dx = array_arg(block, 9, DT)
            dw = array_arg(block, 10, DT)
            N = scalar_arg(block, NA, 0)
            C = scalar_arg(block, NA, 1)
            K = scalar_arg(block, NA, 2)
            want_dx = scalar_arg(block, NA, 6)
            want_dw = scalar_arg(block, NA, 7)
            nbi = C // B
            n_dx = nbi if want_dx else 0
            n_dw = entry_rows.shape[0] if want_dw else 0
            t = fetch_add(block, NEXT_TASK, 1)
            while t < n_dx + n_dw:
                if t < n_dx:
                    i = t
                    for n in range(N):
                        for kk in range(B):
                            acc = vzero(DT(0), L)
                            for e in range(row_ptr[i], row_ptr[i + 1]):
                                wrow = row_slots[e] * BB + kk * B
                                drow = n * K + row_cols[e] * B
                                for v in range(NV):
                                    acc = vfma(vload(w, wrow + v * L, L), vload(dy, drow + v * L, L), acc)
                            dx[n * C + i * B + kk] = vsum(acc)
                else:
                    e = t - n_dx
                    i0 = entry_rows[e] * B
                    j0 = entry_cols[e] * B
                    out = entry_slots[e] * BB
                    for kk in range(B):
                        for half in range(HALVES):
                            coff = half * 2 * L
                            c0 = vzero(DT(0), L)
                            if NV == 1:
                                c0, c1 = mma_1x1(c0, c0, x, i0 + kk, C, dy, j0, K, N, L)
                                vstore(dw, out + kk * B, vadd(c0, c1))
                            else:
                                c0, c1 = mma_1x2(c0, c0, x, i0 + kk, C, dy, j0 + coff, K, N, L)
                                vstore(dw, out + kk * B + coff, c0)
                                vstore(dw, out + kk * B + coff + L, c1)
                t = fetch_add(block, NEXT_TASK, 1)
    return program
