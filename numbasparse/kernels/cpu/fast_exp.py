"""``exp`` for numba loops that LLVM can vectorize: :func:`exp_approx`, and
:func:`constant_like` for constants that keep float32 arithmetic in float32.

numba lowers ``math.exp`` to a libm call per element (no vector math library is
configured), which keeps a loop scalar.  ``exp_approx`` on float32 is the Cephes
``expf`` polynomial (about 2 ulp over the clamped range ``[-87.3, 88.3]``; beyond it the
result saturates at ``exp(-87.3)`` or ``exp(88.3)``; NaN gives NaN) with the power of
two built from bits, so the loop vectorizes.  Callers compiled with fast-math must
leave out the "no NaNs" flag, or LLVM may drop the NaN test.  On float64 it is ``math.exp`` (exact; for references
and gradient checks, not for speed).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["exp_approx", "constant_like"]

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOW = np.float32(-87.3)
_HIGH = np.float32(88.3)
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                   1.6666665459e-1, 5.0000001201e-1))


@intrinsic
def _pow2_float32(typingctx, n):
    """``2.0 ** n`` as float32 for an int32 ``n`` in [-126, 127], from its bits."""
    if n != types.int32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.int32), codegen


def exp_approx(x):
    """``exp(x)``: vectorizable polynomial on float32, ``math.exp`` on float64 (numba only)."""
    raise NotImplementedError("exp_approx is for numba-compiled code")


@overload(exp_approx)
def _exp_approx(x):
    if x == types.float64:
        return lambda x: math.exp(x)
    if x != types.float32:
        return None

    def impl(x):
        clamped = x if x > _LOW else _LOW
        clamped = clamped if clamped < _HIGH else _HIGH
        n = np.floor(clamped * _LOG2E + np.float32(0.5))
        r = clamped - n * _LN2_HI - n * _LN2_LO
        p = _P[0]
        p = p * r + _P[1]
        p = p * r + _P[2]
        p = p * r + _P[3]
        p = p * r + _P[4]
        p = p * r + _P[5]
        result = (p * (r * r) + r + np.float32(1.0)) * _pow2_float32(np.int32(n))
        return result if x == x else x   # NaN stays NaN (the clamps would make it finite)

    return impl


def constant_like(array, value):
    """``value`` in ``array``'s dtype (numba only).  A plain ``1`` next to a float32 would
    promote the expression to float64 and keep the loop scalar."""
    raise NotImplementedError("constant_like is for numba-compiled code")


@overload(constant_like, inline="always")
def _constant_like(array, value):
    dtype = array.dtype
    return lambda array, value: dtype(value)
