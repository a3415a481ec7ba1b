"""The compute core of a packed matmul task: one output block column over one chunk.

``out[rows of chunk, columns of the output block] = bias + sum over the live blocks e
of the block column: a-panel(ch, other[e]) @ b[slots[e]]``

where an a-panel is a packed row panel (``NCp x B``, :mod:`.panels`) and ``b[s]`` a
``B x B`` block with rows as reduction index and columns as outputs: the forward
pass, with x panels and the weight blocks of an output column.  (A data gradient
run the same way, on transposed weight blocks, measured slower than the transposed
sweep of :mod:`.matmul_backward` at every density: 0.58 against 0.64 of dense
throughput at density 0.1, batch 256.)

Register tiles of rows x output columns (``8x2`` vectors; ``16x1`` for one-vector
blocks) sweep the chunk.  The live blocks are taken ``GROUP`` at a time, so a group's
``b`` blocks stay in L1 while the whole chunk streams past them (the next group's
are prefetched meanwhile); partial sums wait in ``tile`` (``NCp x B``, this thread's)
between groups, and the last group writes ``out`` straight from registers (rows of a
partly valid last tile go through ``tile``).
"""
from __future__ import annotations

from numba import njit

from .panels import GROUP, copy_rows, prefetch_part
from .tiles import (load_8x2, load_16x1, mma_8x2, mma_16x1, rows_8x2, rows_16x1, store_8x2, store_16x1, zero_8x2,
                    zero_16x1)


@njit(inline="always", cache=True)
def sweep_8x2(out, out0, ld, valid, a, a_blocks, ch, NCp, e_beg, e_end, other, slots, b, bias, bias0, has_bias,
              tile, coff, B, L, LINE, zero):
    """Columns ``coff .. coff + 2L`` of the block column (``8x2`` tiles)."""
    BB = B * B
    e0 = e_beg
    while e0 < e_end:
        e1 = min(e0 + GROUP, e_end)
        e2 = min(e1 + GROUP, e_end)
        for r in range(0, NCp, 8):
            if coff == 0:
                prefetch_part(b, slots, e1, e2, r // 8, NCp // 8, BB, LINE)
            if e0 != e_beg:
                acc = load_8x2(tile, r * B + coff, B, L)
            elif has_bias:
                acc = rows_8x2(bias, bias0 + coff, L)
            else:
                acc = zero_8x2(zero, L)
            for e in range(e0, e1):
                acc = mma_8x2(acc, a, ((ch * a_blocks + other[e]) * NCp + r) * B, B, 1,
                              b, slots[e] * BB + coff, B, B, L)
            if e1 == e_end and r + 8 <= valid:
                store_8x2(acc, out, out0 + r * ld + coff, ld, L)
            else:
                store_8x2(acc, tile, r * B + coff, B, L)
        e0 = e1


@njit(inline="always", cache=True)
def sweep_16x1(out, out0, ld, valid, a, a_blocks, ch, NCp, e_beg, e_end, other, slots, b, bias, bias0, has_bias,
               tile, B, L, LINE, zero):
    """The whole (one-vector-wide) block column (``16x1`` tiles)."""
    BB = B * B
    e0 = e_beg
    while e0 < e_end:
        e1 = min(e0 + GROUP, e_end)
        e2 = min(e1 + GROUP, e_end)
        for r in range(0, NCp, 16):
            prefetch_part(b, slots, e1, e2, r // 16, NCp // 16, BB, LINE)
            if e0 != e_beg:
                acc = load_16x1(tile, r * B, B, L)
            elif has_bias:
                acc = rows_16x1(bias, bias0, L)
            else:
                acc = zero_16x1(zero, L)
            for e in range(e0, e1):
                acc = mma_16x1(acc, a, ((ch * a_blocks + other[e]) * NCp + r) * B, B, 1, b, slots[e] * BB, B, B, L)
            if e1 == e_end and r + 16 <= valid:
                store_16x1(acc, out, out0 + r * ld, ld, L)
            else:
                store_16x1(acc, tile, r * B, B, L)
        e0 = e1


@njit(inline="always", cache=True)
def finish_tail(tile, out, out0, ld, valid, MR, B, L, NV):
    """Copy the rows of a partly valid last tile (kept in ``tile``) to ``out``."""
    tail = valid // MR * MR
    copy_rows(tile, tail * B, B, out, out0 + tail * ld, ld, valid - tail, B, L, NV)
