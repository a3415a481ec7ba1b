"""Packed operands of the CPU matmul programs, and the moves in and out of them.

Rows are processed in chunks of ``NCp`` rows (a multiple of the tallest register tile,
at most ``MAX_CHUNK``); rows past ``N`` in the last chunk are zeros, so every tile is
full and padded rows contribute nothing.  Panels, for chunk ``ch`` and block ``b``:

* row panels (``xp`` of x, ``dyp`` of dy): ``a[rows, bB:(b+1)B]``, row-major ``NCp x B``,
  at ``((ch * blocks + b) * NCp) * B`` (:func:`pack_rows`);
* transposed panels (``dyt`` of dy): the same block transposed, stored as ``NCp/RV``
  sub-panels of ``B x RV`` (``RV`` = two vectors of rows), so a register tile reads
  one contiguous sub-panel (:func:`pack_transposed`, :func:`unpack_transposed`).

Panels hold the accumulator type (:func:`.formats.accumulator_type`): packing a 16-bit operand
widens it once, so the register tiles read float32.  Everything here is
``inline="always"``: compile-time constants of the calling
program (block size, vector lanes) reach the vector code.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from . import VECTOR_BYTES
from .simd import prefetch, sload, sstore, transpose_copy, vload, vstore, vzero

GROUP = 4            # live blocks whose weights a tile sweep keeps in L1
PREFETCH_BLOCKS = 2  # direct forward: weight blocks requested this far ahead of use
DIRECT_ROWS = 16     # fewer rows than this: direct (unpacked) programs
MAX_CHUNK = 256      # rows per packed chunk, at most


def geometry(dtype, B):
    """``(L, NV, VL)``: lanes per vector of a block row, vectors per block row, lanes
    of a full vector."""
    VL = VECTOR_BYTES // np.dtype(dtype).itemsize
    L = min(B, VL)
    return L, B // L, VL


def row_multiple(dtype) -> int:
    """Packed chunks hold a multiple of this many rows (the tallest tile's height)."""
    return max(16, 2 * (VECTOR_BYTES // np.dtype(dtype).itemsize))


@njit(inline="always", cache=True)
def pack_rows(a, ap, ch, blk, N, width, NCp, B, L, NV, zero):
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
def pack_transposed(a, at, ch, blk, N, width, NCp, B, RV, VL, zero):
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
                transpose_copy(a, (n0 + r0) * width + blk * B + c0, width, at, sub + c0 * RV, RV, VL)
        else:
            for r in range(r0, r0 + VL):
                for c in range(B):
                    at[sub + r - r0 + c * RV] = sload(a, (n0 + r) * width + blk * B + c) if r < valid else zero


@njit(inline="always", cache=True)
def unpack_transposed(tile, out, row0, col0, width, first, last, B, RV, VL):
    """Inverse of :func:`pack_transposed` for rows ``first <= r < last`` of one
    ``B x NCp`` tile of sub-panels: ``out[(row0 + r)*width + col0 + c] = tile[(r, c)]``."""
    for r0 in range(first, last, VL):
        sub = (r0 // RV) * B * RV + r0 % RV
        if B >= VL and r0 + VL <= last:
            for c0 in range(0, B, VL):
                transpose_copy(tile, sub + c0 * RV, RV, out, (row0 + r0) * width + col0 + c0, width, VL)
        else:
            for r in range(r0, min(r0 + VL, last)):
                for c in range(B):
                    sstore(out, (row0 + r) * width + col0 + c, tile[sub + r - r0 + c * RV])


@njit(inline="always", cache=True)
def prefetch_part(w, slots, e_begin, e_end, part, parts, BB, LINE):
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
def widen_blocks(w, slots, e_begin, e_end, wide, B, L, NV):
    """``wide[(e - e_begin)*B*B ...]`` = block ``w[slots[e]]``, ``e_begin <= e < e_end``,
    in the accumulator type: a group of 16-bit weight blocks widened once, for a tile
    sweep that reads each of them many times."""
    BB = B * B
    for e in range(e_begin, e_end):
        copy_rows(w, slots[e] * BB, B, wide, (e - e_begin) * BB, B, B, B, L, NV)


@njit(inline="always", cache=True)
def copy_rows(src, s0, ld_src, dst, d0, ld_dst, rows, B, L, NV):
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld_dst + v * L, vload(src, s0 + r * ld_src + v * L, L))


@njit(inline="always", cache=True)
def fill_rows(dst, d0, ld, rows, B, L, NV, src, s0, use_src, zero):
    """``rows`` rows of ``B`` values at ``dst[d0 + r*ld]``: ``src[s0:s0+B]`` if
    ``use_src``, else zeros."""
    z = vzero(zero, L)
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld + v * L, vload(src, s0 + v * L, L) if use_src else z)


@njit(inline="always", cache=True)
def zero_rows(dst, d0, ld, rows, B, L, NV, zero):
    z = vzero(zero, L)
    for r in range(rows):
        for v in range(NV):
            vstore(dst, d0 + r * ld + v * L, z)
