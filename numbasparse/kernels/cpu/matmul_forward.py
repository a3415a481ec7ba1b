"""The block-sparse matmul forward programs for CPUs: ``y = x @ W (+ bias)``.

Shapes (one dtype: float32, float64, or bfloat16 / float16 as 16-bit patterns, see
:mod:`.simd`, computed in float32): ``x (N, C)``, ``y (N, K)``, blocks
``w (capacity, B, B)`` with ``C = in_blocks*B``, ``K = out_blocks*B``; block ``w[s]``
of live entry ``(i, j)`` maps ``x[:, iB:(i+1)B]`` into ``y[:, jB:(j+1)B]``.  Arrays
reach a program flattened (1-D, C order) through its argument block (:mod:`.args`);
the program is built per ``(dtype, B)`` (tile shapes and vector widths are
compile-time constants) and compiled once (numba's cache).

How threads map to data (tasks handed out by an atomic counter, :mod:`.runtime`):

* packed program, task ``(chunk, j)``: ``y[rows of chunk, jB:(j+1)B]``, after the
  packing tasks (one per x panel) are done.  Register tiles of rows x output columns
  (``8x2`` vectors, or ``16x1`` for one-vector blocks) sweep the chunk; the live
  blocks of column ``j`` are taken ``GROUP`` at a time, so a group's weight blocks stay
  in L1 while the whole chunk streams past them (the next group's are prefetched
  meanwhile); partial sums wait in a per-thread tile between groups, and the last
  group writes ``y`` straight from registers.  16-bit x panels are widened when
  packed, 16-bit weight groups when the group starts (:func:`tile_extra`).
* direct program (fewer than ``DIRECT_ROWS`` rows: nothing worth packing), task = a
  run of output block columns: one row at a time, each weight block streamed once
  (the batch-1 regime, bound by memory).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, types

from .args import JOINED, NEXT_TASK, PACKED, array_arg, scalar_arg
from .formats import accumulator_type, storage_type
from .panels import (GROUP, PREFETCH_BLOCKS, copy_rows, fill_rows, geometry, pack_rows, prefetch_part,
                     widen_blocks)
from .simd import atomic_load, fetch_add, prefetch, vadd, vload, vstore, vzero
from .tiles import (load_8x2, load_16x1, mma_1x1, mma_1x2, mma_8x2, mma_16x1, rows_8x2, rows_16x1, store_8x2,
                    store_16x1, zero_8x2, zero_16x1)

_SIGNATURE = types.void(types.voidptr)


def tile_extra(dtype_name: str, B: int) -> int:
    """Scratch per thread beyond its ``NCp x B`` tile: for 16-bit weights, room for one
    group of weight blocks widened to float32 (the register tiles then read float32
    from L1 instead of converting every weight vector once per row tile)."""
    return GROUP * B * B if accumulator_type(dtype_name) is not storage_type(dtype_name) else 0


@functools.lru_cache(maxsize=None)
def forward_program(dtype_name: str, B: int, packed: bool):
    """``y = x @ W (+ bias)``.  Arrays: x, w, col_ptr, col_rows, col_slots, y, xp,
    tiles, bias (length K, or anything when has_bias is 0).
    Scalars: N, C, K, NCp, n_chunks, threads, has_bias, run (direct program: output
    block columns a thread takes at a time, so each streams a long run of weights)."""
    DT = storage_type(dtype_name)                 # element type of the operands
    AT = accumulator_type(dtype_name)            # of registers, packed panels, tiles
    L, NV, _ = geometry(AT, B)
    BB = B * B
    HALVES = max(1, NV // 2)      # column groups of two vectors (NV = 4 has two)
    MR = 16 if NV == 1 else 8     # rows per register tile
    LINE = 64 // np.dtype(DT).itemsize
    NA = 9
    WIDEN = DT is not AT           # 16-bit weights: each group widened once into ``wide``
    STRIDE_EXTRA = tile_extra(dtype_name, B)

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
            xp = array_arg(block, 6, AT)
            tiles = array_arg(block, 7, AT)
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
            stride = NCp * B + STRIDE_EXTRA
            tile = tiles[me * stride:me * stride + NCp * B]
            wide = tiles[me * stride + NCp * B:(me + 1) * stride]
            nbi = C // B
            nbo = K // B
            n_pack = n_chunks * nbi
            n_tasks = n_pack + n_chunks * nbo
            t = fetch_add(block, NEXT_TASK, 1)
            while t < n_tasks:
                if t < n_pack:
                    pack_rows(x, xp, t // nbi, t % nbi, N, C, NCp, B, L, NV, AT(0))
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
                        fill_rows(y, n0 * K + j * B, K, valid, B, L, NV, bias, j * B, has_bias, AT(0))
                    else:
                        for half in range(HALVES):
                            coff = half * 2 * L
                            e0 = e_beg
                            while e0 < e_end:
                                e1 = min(e0 + GROUP, e_end)
                                e2 = min(e1 + GROUP, e_end)
                                if WIDEN:
                                    widen_blocks(w, slots, e0, e1, wide, B, L, NV)
                                    wsrc = wide
                                else:
                                    wsrc = w
                                for r in range(0, NCp, MR):
                                    if half == 0:
                                        prefetch_part(w, slots, e1, e2, r // MR, NCp // MR, BB, LINE)
                                    if NV == 1:
                                        if e0 != e_beg:
                                            acc = load_16x1(tile, r * B, B, L)
                                        elif has_bias:
                                            acc = rows_16x1(bias, j * B, L)
                                        else:
                                            acc = zero_16x1(AT(0), L)
                                        for e in range(e0, e1):
                                            acc = mma_16x1(acc, xp, ((ch * nbi + rows[e]) * NCp + r) * B, B, 1,
                                                           wsrc, ((e - e0) if WIDEN else slots[e]) * BB, B, B, L)
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
                                            acc = zero_8x2(AT(0), L)
                                        for e in range(e0, e1):
                                            acc = mma_8x2(acc, xp, ((ch * nbi + rows[e]) * NCp + r) * B, B, 1,
                                                          wsrc, ((e - e0) if WIDEN else slots[e]) * BB + coff, B,
                                                          B, L)
                                        if e1 == e_end and r + MR <= valid:
                                            store_8x2(acc, y, (n0 + r) * K + j * B + coff, K, L)
                                        else:
                                            store_8x2(acc, tile, r * B + coff, B, L)
                                e0 = e1
                        # rows of a partly valid last tile went through the tile
                        tail = valid // MR * MR
                        copy_rows(tile, tail * B, B, y, (n0 + tail) * K + j * B, K, valid - tail, B, L, NV)
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
                            c0 = vzero(AT(0), L)
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
