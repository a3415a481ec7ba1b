"""The 4x4 register-blocked dot-product micro-kernel shared by the CPU kernels.

Every CPU kernel reduces packed, contiguous panels: output ``(r, c)`` is the dot
product of row ``r`` of one panel with row ``c`` of another.  ``_dot4x4`` computes a
4x4 tile of such outputs with 16 accumulators; after LLVM vectorizes the reduction
loop each accumulator is one SIMD register, and every step does 8 vector loads for
16 fused multiply-adds.
"""
import numpy as np
from numba import njit, uint64

# reassoc lets LLVM vectorize the reductions; no nnan/ninf, so NaN and inf propagate.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(fastmath=FASTMATH, cache=True, inline="always")
def dot4x4(a, a0, at, b, b0, bt, length, out, r0, c0, accumulate):
    """out[r0+r, c0+c] (+)= sum_t a[a0+r, at+t] * b[b0+c, bt+t] for r, c in 0..3."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0)
    a_0 = a[a0]
    a_1 = a[a0 + 1]
    a_2 = a[a0 + 2]
    a_3 = a[a0 + 3]
    b_0 = b[b0]
    b_1 = b[b0 + 1]
    b_2 = b[b0 + 2]
    b_3 = b[b0 + 3]
    # Unsigned indices: no negative-index wraparound in the loop, so LLVM vectorizes it.
    ua = uint64(at)
    ub = uint64(bt)
    for t in range(uint64(length)):
        x0 = a_0[ua + t]
        x1 = a_1[ua + t]
        x2 = a_2[ua + t]
        x3 = a_3[ua + t]
        w0 = b_0[ub + t]
        w1 = b_1[ub + t]
        w2 = b_2[ub + t]
        w3 = b_3[ub + t]
        s00 += x0 * w0
        s01 += x0 * w1
        s02 += x0 * w2
        s03 += x0 * w3
        s10 += x1 * w0
        s11 += x1 * w1
        s12 += x1 * w2
        s13 += x1 * w3
        s20 += x2 * w0
        s21 += x2 * w1
        s22 += x2 * w2
        s23 += x2 * w3
        s30 += x3 * w0
        s31 += x3 * w1
        s32 += x3 * w2
        s33 += x3 * w3
    if accumulate:
        s00 += out[r0, c0]
        s01 += out[r0, c0 + 1]
        s02 += out[r0, c0 + 2]
        s03 += out[r0, c0 + 3]
        s10 += out[r0 + 1, c0]
        s11 += out[r0 + 1, c0 + 1]
        s12 += out[r0 + 1, c0 + 2]
        s13 += out[r0 + 1, c0 + 3]
        s20 += out[r0 + 2, c0]
        s21 += out[r0 + 2, c0 + 1]
        s22 += out[r0 + 2, c0 + 2]
        s23 += out[r0 + 2, c0 + 3]
        s30 += out[r0 + 3, c0]
        s31 += out[r0 + 3, c0 + 1]
        s32 += out[r0 + 3, c0 + 2]
        s33 += out[r0 + 3, c0 + 3]
    out[r0, c0] = s00
    out[r0, c0 + 1] = s01
    out[r0, c0 + 2] = s02
    out[r0, c0 + 3] = s03
    out[r0 + 1, c0] = s10
    out[r0 + 1, c0 + 1] = s11
    out[r0 + 1, c0 + 2] = s12
    out[r0 + 1, c0 + 3] = s13
    out[r0 + 2, c0] = s20
    out[r0 + 2, c0 + 1] = s21
    out[r0 + 2, c0 + 2] = s22
    out[r0 + 2, c0 + 3] = s23
    out[r0 + 3, c0] = s30
    out[r0 + 3, c0 + 1] = s31
    out[r0 + 3, c0 + 2] = s32
    out[r0 + 3, c0 + 3] = s33
