"""16-bit float formats inside the CPU kernels: which integer arrays hold them, and the
LLVM IR that widens them to float32 and rounds float32 back (used by :mod:`.simd`).

numba has no CPU float16 or bfloat16 type, so 16-bit floats travel as integer arrays: a
``uint16`` array holds bfloat16 bit patterns (the top half of a float32), an ``int16``
array IEEE float16 ones.  Widening is exact; narrowing rounds to nearest even, and a
NaN stays a NaN.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types

__all__ = ["BFLOAT16", "FLOAT16", "storage_type", "accumulator_type"]

#: numpy storage types of the 16-bit float formats (bit patterns), see the module docstring.
BFLOAT16 = np.uint16
FLOAT16 = np.int16
_STORAGE = {"bfloat16": BFLOAT16, "float16": FLOAT16}


def storage_type(dtype_name: str):
    """The numpy type whose arrays hold ``dtype_name`` values inside the kernels."""
    return _STORAGE.get(dtype_name) or np.dtype(dtype_name).type


def accumulator_type(dtype_name: str):
    """The numpy type a program computes in, and keeps its packed panels and tiles
    in: float32 for the 16-bit formats (their values widen exactly), else the dtype."""
    return np.float32 if dtype_name in _STORAGE else np.dtype(dtype_name).type


def _is_half(dtype) -> bool:
    return dtype in (types.uint16, types.int16)


def _compute(dtype):
    """The type values of a ``dtype`` array are computed in."""
    return types.float32 if _is_half(dtype) else dtype


def _like(value_type, element):
    """``element`` as a scalar or a vector shaped like ``value_type``."""
    return ir.VectorType(element, value_type.count) if isinstance(value_type, ir.VectorType) else element


def _constant(value_type, element, value):
    if isinstance(value_type, ir.VectorType):
        return ir.Constant(ir.VectorType(element, value_type.count), [value] * value_type.count)
    return ir.Constant(element, value)


def _widen(builder, raw, storage):
    """float32 values (scalar or vector) of the 16-bit patterns ``raw`` (i16s)."""
    if storage == types.int16:
        return builder.fpext(builder.bitcast(raw, _like(raw.type, ir.HalfType())), _like(raw.type, ir.FloatType()))
    i32 = _like(raw.type, ir.IntType(32))
    bits = builder.shl(builder.zext(raw, i32), _constant(raw.type, ir.IntType(32), 16))
    return builder.bitcast(bits, _like(raw.type, ir.FloatType()))


def _narrow(builder, value, storage):
    """The 16-bit patterns (i16s) of float32 ``value``, rounded to nearest even."""
    i16 = _like(value.type, ir.IntType(16))
    if storage == types.int16:
        return builder.bitcast(builder.fptrunc(value, _like(value.type, ir.HalfType())), i16)
    i32 = ir.IntType(32)
    bits = builder.bitcast(value, _like(value.type, i32))
    odd = builder.and_(builder.lshr(bits, _constant(value.type, i32, 16)), _constant(value.type, i32, 1))
    rounded = builder.add(builder.add(bits, _constant(value.type, i32, 0x7FFF)), odd)
    top = builder.trunc(builder.lshr(rounded, _constant(value.type, i32, 16)), i16)
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.select(is_nan, _constant(value.type, ir.IntType(16), 0x7FC0), top)


def _load_values(builder, ptr, storage, lanes, align):
    """``lanes`` values (``None``: one scalar) at element pointer ``ptr``, widened to
    the compute type."""
    target = ptr.type.pointee if lanes is None else ir.VectorType(ptr.type.pointee, lanes)
    raw = builder.load(builder.bitcast(ptr, target.as_pointer()), align=align)
    return _widen(builder, raw, storage) if _is_half(storage) else raw


def _store_values(builder, value, ptr, storage, align):
    if _is_half(storage):
        value = _narrow(builder, value, storage)
    builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=align)
