"""The block-sparse matmul backward programs for CPUs: the data gradient
``dx = dy @ W.T`` and the weight gradient ``dw[s] = x_i.T @ dy_j`` in one launch.

Shapes as in :mod:`.matmul_forward` (``dy`` is ``(N, K)``, ``dx`` ``(N, C)``,
``dw`` ``(capacity, B, B)``, written at live slots only).  Packing tasks come first
(x and dy row panels for the weight gradient, transposed dy panels for the data
gradient, :mod:`.panels`); then:

* data gradient, task ``(chunk, i)``: ``dx[rows, iB:(i+1)B]``, computed transposed
  (``8x2`` tiles of input features x rows: weight rows broadcast, transposed dy
  panels as vectors), so no weight is ever transposed; each finished sub-panel is
  transposed back into ``dx`` through registers while it is still in L1.
* weight gradient, task = live entry ``(i, j, s)``: ``dw[s]``, tiles of input
  features x output columns reduced over all rows (x panels down a column, dy panel
  rows as vectors) without leaving registers.
* direct program (fewer than ``DIRECT_ROWS`` rows): the same tasks on unpacked rows
  (dot products with a horizontal sum for ``dx``).

Every task owns its outputs and reduces in a fixed order: results are bit-identical
for any thread count.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, types

from .args import JOINED, NEXT_TASK, PACKED, array_arg, scalar_arg
from .formats import accumulator_type, storage_type
from .matmul_forward import tile_extra
from .panels import (GROUP, geometry, pack_rows, pack_transposed, prefetch_part, unpack_transposed,
                     widen_blocks, zero_rows)
from .simd import atomic_load, fetch_add, sstore, vadd, vfma, vload, vstore, vsum, vzero
from .tiles import (load_8x2, mma_1x1, mma_1x2, mma_8x1, mma_8x2, mma_16x1, store_8x1, store_8x2, store_16x1,
                    zero_8x1, zero_8x2, zero_16x1)

_SIGNATURE = types.void(types.voidptr)


@functools.lru_cache(maxsize=None)
def backward_program(dtype_name: str, B: int, packed: bool):
    """``dx = dy @ W.T`` and/or ``dw[s] = x_i.T @ dy_j`` (live slots).

    Arrays: x, dy, w, row_ptr, row_cols, row_slots, entry_rows, entry_cols,
    entry_slots, dx, dw, xp, dyp, dyt, tiles.  Scalars: N, C, K, NCp, n_chunks,
    threads, want_dx, want_dw.
    """
    DT = storage_type(dtype_name)                 # element type of the operands
    AT = accumulator_type(dtype_name)            # of registers, packed panels, tiles
    L, NV, VL = geometry(AT, B)
    BB = B * B
    HALVES = max(1, NV // 2)
    WIDE = NV == 1 and B >= 16     # one-vector rows, 16 of them: 16x1 weight-gradient tiles
    LINE = 64 // np.dtype(DT).itemsize
    NA = 15
    WIDEN = DT is not AT           # 16-bit weights: each group widened once into ``wide``
    STRIDE_EXTRA = tile_extra(dtype_name, B)

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
            xp = array_arg(block, 11, AT)
            dyp = array_arg(block, 12, AT)
            dyt = array_arg(block, 13, AT)
            tiles = array_arg(block, 14, AT)
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
            stride = NCp * B + STRIDE_EXTRA
            tile = tiles[me * stride:me * stride + NCp * B]
            wide = tiles[me * stride + NCp * B:(me + 1) * stride]
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
                        pack_rows(x, xp, t // nbi, t % nbi, N, C, NCp, B, L, NV, AT(0))
                    elif t < n_xp + n_dyp:
                        u = t - n_xp
                        pack_rows(dy, dyp, u // nbo, u % nbo, N, K, NCp, B, L, NV, AT(0))
                    else:
                        u = t - n_xp - n_dyp
                        pack_transposed(dy, dyt, u // nbo, u % nbo, N, K, NCp, B, 2 * VL, VL, AT(0))
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
                            zero_rows(dx, n0 * C + i * B, C, valid, B, L, NV, AT(0))
                        else:
                            RV = 2 * VL
                            e0 = e_beg
                            while e0 < e_end:
                                e1 = min(e0 + GROUP, e_end)
                                e2 = min(e1 + GROUP, e_end)
                                if WIDEN:
                                    widen_blocks(w, row_slots, e0, e1, wide, B, L, NV)
                                    wsrc = wide
                                else:
                                    wsrc = w
                                for q in range(NCp // RV):
                                    prefetch_part(w, row_slots, e1, e2, q, NCp // RV, BB, LINE)
                                    for kk in range(0, B, 8):
                                        t0 = (q * B + kk) * RV
                                        if e0 == e_beg:
                                            acc = zero_8x2(AT(0), VL)
                                        else:
                                            acc = load_8x2(tile, t0, RV, VL)
                                        for e in range(e0, e1):
                                            acc = mma_8x2(acc, wsrc,
                                                          ((e - e0) if WIDEN else row_slots[e]) * BB + kk * B, B, 1,
                                                          dyt, ((ch * nbo + row_cols[e]) * NCp + q * RV) * B, RV,
                                                          B, VL)
                                        store_8x2(acc, tile, t0, RV, VL)
                                    if e1 == e_end:   # sub-panel q is final: out while it is in L1
                                        unpack_transposed(tile, dx, n0, i * B, C, q * RV, min(valid, q * RV + RV),
                                                           B, RV, VL)
                                e0 = e1
                    else:
                        e = u - n_dx
                        i = entry_rows[e]
                        j = entry_cols[e]
                        out = entry_slots[e] * BB
                        if WIDE:
                            acc16 = zero_16x1(AT(0), L)
                            for ch in range(n_chunks):
                                acc16 = mma_16x1(acc16, xp, (ch * nbi + i) * NCp * B, 1, B,
                                                 dyp, (ch * nbo + j) * NCp * B, B, NCp, L)
                            store_16x1(acc16, dw, out, B, L)
                        elif NV == 1:
                            acc8 = zero_8x1(AT(0), L)
                            for ch in range(n_chunks):
                                acc8 = mma_8x1(acc8, xp, (ch * nbi + i) * NCp * B, 1, B,
                                               dyp, (ch * nbo + j) * NCp * B, B, NCp, L)
                            store_8x1(acc8, dw, out, B, L)
                        else:
                            for kk in range(0, B, 8):
                                for half in range(HALVES):
                                    coff = half * 2 * L
                                    acc = zero_8x2(AT(0), L)
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
                            acc = vzero(AT(0), L)
                            for e in range(row_ptr[i], row_ptr[i + 1]):
                                wrow = row_slots[e] * BB + kk * B
                                drow = n * K + row_cols[e] * B
                                for v in range(NV):
                                    acc = vfma(vload(w, wrow + v * L, L), vload(dy, drow + v * L, L), acc)
                            sstore(dx, n * C + i * B + kk, vsum(acc))
                else:
                    e = t - n_dx
                    i0 = entry_rows[e] * B
                    j0 = entry_cols[e] * B
                    out = entry_slots[e] * BB
                    for kk in range(B):
                        for half in range(HALVES):
                            coff = half * 2 * L
                            c0 = vzero(AT(0), L)
                            if NV == 1:
                                c0, c1 = mma_1x1(c0, c0, x, i0 + kk, C, dy, j0, K, N, L)
                                vstore(dw, out + kk * B, vadd(c0, c1))
                            else:
                                c0, c1 = mma_1x2(c0, c0, x, i0 + kk, C, dy, j0 + coff, K, N, L)
                                vstore(dw, out + kk * B + coff, c0)
                                vstore(dw, out + kk * B + coff + L, c1)
                t = fetch_add(block, NEXT_TASK, 1)
    return program
