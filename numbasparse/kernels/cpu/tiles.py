"""Register tiles: the outer-product micro-kernels shared by the CPU kernels.

A tile ``R x V`` is ``R`` rows of ``V`` SIMD vectors of ``L`` lanes, held as a tuple
of ``R*V`` :class:`~numbasparse.kernels.cpu.simd.Vector` values (row-major), which
LLVM keeps in registers.  Every kernel reduces with one operation::

    mma_RxV(acc, a, a0, ars, aks, b, b0, bks, klen, L):
        for k in range(klen):
            for r in range(R), v in range(V):
                acc[r, v] += a[a0 + r*ars + k*aks] * b[b0 + k*bks + v*L : ... + L]

one broadcast of ``a`` per row and one vector load of ``b`` per column vector, then
``R*V`` fused multiply-adds per step.  The strides say what the operands are, so the
same tile serves the forward pass (``a`` = activation rows, ``b`` = weight rows), the
data gradient (``a`` = weight rows, ``b`` = transposed activations) and the weight
gradient (``a`` = activations read down a column, ``b`` = gradient rows).

Shapes: ``8x2`` and ``16x1`` (16 accumulators: on AVX-512 16 of the 32 zmm registers,
leaving room for the operands), ``8x1`` (for 8-wide blocks, which have only 8 rows),
and the single-row ``1x2``/``1x1`` used when there are too few rows to pack.
``load``/``store`` move a tile from/to rows ``off + r*ld`` of a 1-D array.
"""
from __future__ import annotations

from numba import njit

from .simd import vfma, vload, vsplat, vstore, vzero

_INLINE = {"inline": "always", "cache": True}


# ---------------------------------------------------------------------------- 8 x 2
@njit(**_INLINE)
def zero_8x2(sample, L):
    z = vzero(sample, L)
    return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)


@njit(**_INLINE)
def rows_8x2(src, off, L):
    """Every row = ``src[off:off + 2L]`` (a bias row, say)."""
    v0 = vload(src, off, L)
    v1 = vload(src, off + L, L)
    return (v0, v1, v0, v1, v0, v1, v0, v1, v0, v1, v0, v1, v0, v1, v0, v1)


@njit(**_INLINE)
def load_8x2(src, off, ld, L):
    return (vload(src, off, L), vload(src, off + L, L),
            vload(src, off + ld, L), vload(src, off + ld + L, L),
            vload(src, off + 2 * ld, L), vload(src, off + 2 * ld + L, L),
            vload(src, off + 3 * ld, L), vload(src, off + 3 * ld + L, L),
            vload(src, off + 4 * ld, L), vload(src, off + 4 * ld + L, L),
            vload(src, off + 5 * ld, L), vload(src, off + 5 * ld + L, L),
            vload(src, off + 6 * ld, L), vload(src, off + 6 * ld + L, L),
            vload(src, off + 7 * ld, L), vload(src, off + 7 * ld + L, L))


@njit(**_INLINE)
def store_8x2(acc, dst, off, ld, L):
    vstore(dst, off, acc[0])
    vstore(dst, off + L, acc[1])
    vstore(dst, off + ld, acc[2])
    vstore(dst, off + ld + L, acc[3])
    vstore(dst, off + 2 * ld, acc[4])
    vstore(dst, off + 2 * ld + L, acc[5])
    vstore(dst, off + 3 * ld, acc[6])
    vstore(dst, off + 3 * ld + L, acc[7])
    vstore(dst, off + 4 * ld, acc[8])
    vstore(dst, off + 4 * ld + L, acc[9])
    vstore(dst, off + 5 * ld, acc[10])
    vstore(dst, off + 5 * ld + L, acc[11])
    vstore(dst, off + 6 * ld, acc[12])
    vstore(dst, off + 6 * ld + L, acc[13])
    vstore(dst, off + 7 * ld, acc[14])
    vstore(dst, off + 7 * ld + L, acc[15])


@njit(**_INLINE)
def mma_8x2(acc, a, a0, ars, aks, b, b0, bks, klen, L):
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = acc
    for k in range(klen):
        ak = a0 + k * aks
        bk = b0 + k * bks
        b_0 = vload(b, bk, L)
        b_1 = vload(b, bk + L, L)
        s = vsplat(a, ak, L)
        c0 = vfma(s, b_0, c0)
        c1 = vfma(s, b_1, c1)
        s = vsplat(a, ak + ars, L)
        c2 = vfma(s, b_0, c2)
        c3 = vfma(s, b_1, c3)
        s = vsplat(a, ak + 2 * ars, L)
        c4 = vfma(s, b_0, c4)
        c5 = vfma(s, b_1, c5)
        s = vsplat(a, ak + 3 * ars, L)
        c6 = vfma(s, b_0, c6)
        c7 = vfma(s, b_1, c7)
        s = vsplat(a, ak + 4 * ars, L)
        c8 = vfma(s, b_0, c8)
        c9 = vfma(s, b_1, c9)
        s = vsplat(a, ak + 5 * ars, L)
        c10 = vfma(s, b_0, c10)
        c11 = vfma(s, b_1, c11)
        s = vsplat(a, ak + 6 * ars, L)
        c12 = vfma(s, b_0, c12)
        c13 = vfma(s, b_1, c13)
        s = vsplat(a, ak + 7 * ars, L)
        c14 = vfma(s, b_0, c14)
        c15 = vfma(s, b_1, c15)
    return (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)


# --------------------------------------------------------------------------- 16 x 1
@njit(**_INLINE)
def zero_16x1(sample, L):
    z = vzero(sample, L)
    return (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)


@njit(**_INLINE)
def rows_16x1(src, off, L):
    """Every row = ``src[off:off + L]``."""
    v = vload(src, off, L)
    return (v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v)


@njit(**_INLINE)
def load_16x1(src, off, ld, L):
    return (vload(src, off, L), vload(src, off + ld, L), vload(src, off + 2 * ld, L),
            vload(src, off + 3 * ld, L), vload(src, off + 4 * ld, L), vload(src, off + 5 * ld, L),
            vload(src, off + 6 * ld, L), vload(src, off + 7 * ld, L), vload(src, off + 8 * ld, L),
            vload(src, off + 9 * ld, L), vload(src, off + 10 * ld, L), vload(src, off + 11 * ld, L),
            vload(src, off + 12 * ld, L), vload(src, off + 13 * ld, L), vload(src, off + 14 * ld, L),
            vload(src, off + 15 * ld, L))


@njit(**_INLINE)
def store_16x1(acc, dst, off, ld, L):
    vstore(dst, off, acc[0])
    vstore(dst, off + ld, acc[1])
    vstore(dst, off + 2 * ld, acc[2])
    vstore(dst, off + 3 * ld, acc[3])
    vstore(dst, off + 4 * ld, acc[4])
    vstore(dst, off + 5 * ld, acc[5])
    vstore(dst, off + 6 * ld, acc[6])
    vstore(dst, off + 7 * ld, acc[7])
    vstore(dst, off + 8 * ld, acc[8])
    vstore(dst, off + 9 * ld, acc[9])
    vstore(dst, off + 10 * ld, acc[10])
    vstore(dst, off + 11 * ld, acc[11])
    vstore(dst, off + 12 * ld, acc[12])
    vstore(dst, off + 13 * ld, acc[13])
    vstore(dst, off + 14 * ld, acc[14])
    vstore(dst, off + 15 * ld, acc[15])


@njit(**_INLINE)
def mma_16x1(acc, a, a0, ars, aks, b, b0, bks, klen, L):
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = acc
    for k in range(klen):
        ak = a0 + k * aks
        b_0 = vload(b, b0 + k * bks, L)
        c0 = vfma(vsplat(a, ak, L), b_0, c0)
        c1 = vfma(vsplat(a, ak + ars, L), b_0, c1)
        c2 = vfma(vsplat(a, ak + 2 * ars, L), b_0, c2)
        c3 = vfma(vsplat(a, ak + 3 * ars, L), b_0, c3)
        c4 = vfma(vsplat(a, ak + 4 * ars, L), b_0, c4)
        c5 = vfma(vsplat(a, ak + 5 * ars, L), b_0, c5)
        c6 = vfma(vsplat(a, ak + 6 * ars, L), b_0, c6)
        c7 = vfma(vsplat(a, ak + 7 * ars, L), b_0, c7)
        c8 = vfma(vsplat(a, ak + 8 * ars, L), b_0, c8)
        c9 = vfma(vsplat(a, ak + 9 * ars, L), b_0, c9)
        c10 = vfma(vsplat(a, ak + 10 * ars, L), b_0, c10)
        c11 = vfma(vsplat(a, ak + 11 * ars, L), b_0, c11)
        c12 = vfma(vsplat(a, ak + 12 * ars, L), b_0, c12)
        c13 = vfma(vsplat(a, ak + 13 * ars, L), b_0, c13)
        c14 = vfma(vsplat(a, ak + 14 * ars, L), b_0, c14)
        c15 = vfma(vsplat(a, ak + 15 * ars, L), b_0, c15)
    return (c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)


# ---------------------------------------------------------------------------- 8 x 1
@njit(**_INLINE)
def zero_8x1(sample, L):
    z = vzero(sample, L)
    return (z, z, z, z, z, z, z, z)


@njit(**_INLINE)
def store_8x1(acc, dst, off, ld, L):
    vstore(dst, off, acc[0])
    vstore(dst, off + ld, acc[1])
    vstore(dst, off + 2 * ld, acc[2])
    vstore(dst, off + 3 * ld, acc[3])
    vstore(dst, off + 4 * ld, acc[4])
    vstore(dst, off + 5 * ld, acc[5])
    vstore(dst, off + 6 * ld, acc[6])
    vstore(dst, off + 7 * ld, acc[7])


@njit(**_INLINE)
def mma_8x1(acc, a, a0, ars, aks, b, b0, bks, klen, L):
    c0, c1, c2, c3, c4, c5, c6, c7 = acc
    for k in range(klen):
        ak = a0 + k * aks
        b_0 = vload(b, b0 + k * bks, L)
        c0 = vfma(vsplat(a, ak, L), b_0, c0)
        c1 = vfma(vsplat(a, ak + ars, L), b_0, c1)
        c2 = vfma(vsplat(a, ak + 2 * ars, L), b_0, c2)
        c3 = vfma(vsplat(a, ak + 3 * ars, L), b_0, c3)
        c4 = vfma(vsplat(a, ak + 4 * ars, L), b_0, c4)
        c5 = vfma(vsplat(a, ak + 5 * ars, L), b_0, c5)
        c6 = vfma(vsplat(a, ak + 6 * ars, L), b_0, c6)
        c7 = vfma(vsplat(a, ak + 7 * ars, L), b_0, c7)
    return (c0, c1, c2, c3, c4, c5, c6, c7)


# ----------------------------------------------------------------- single rows
@njit(**_INLINE)
def mma_1x2(c0, c1, a, a0, aks, b, b0, bks, klen, L):
    """``(c0, c1) += sum_k a[a0 + k*aks] * b[b0 + k*bks : +2L]``."""
    for k in range(klen):
        s = vsplat(a, a0 + k * aks, L)
        bk = b0 + k * bks
        c0 = vfma(s, vload(b, bk, L), c0)
        c1 = vfma(s, vload(b, bk + L, L), c1)
    return c0, c1


@njit(**_INLINE)
def mma_1x1(c0, c1, a, a0, aks, b, b0, bks, klen, L):
    """``c0 + c1 += sum_k a[a0 + k*aks] * b[b0 + k*bks : +L]``: even k into ``c0``, odd
    into ``c1`` (two independent chains hide the FMA latency); callers add them."""
    k = 0
    while k + 1 < klen:
        c0 = vfma(vsplat(a, a0 + k * aks, L), vload(b, b0 + k * bks, L), c0)
        c1 = vfma(vsplat(a, a0 + (k + 1) * aks, L), vload(b, b0 + (k + 1) * bks, L), c1)
        k += 2
    if k < klen:
        c0 = vfma(vsplat(a, a0 + k * aks, L), vload(b, b0 + k * bks, L), c0)
    return c0, c1

