"""SIMD vectors, atomics and raw pointers for numba.njit code.

numba has no vector types: its loops are vectorized by LLVM or not at all.  The
kernels need register-resident accumulators and explicit vector loads, so this
module adds a small set of intrinsics, each a few lines of LLVM IR:

* ``Vector(dtype, lanes)``: an LLVM vector ``<lanes x dtype>`` held in registers.
* ``vload(a, i, lanes)`` / ``vstore(a, i, v)``: ``a[i:i+lanes]`` of a 1-D
  C-contiguous array, as one vector load or store;
* ``vsplat(a, i, lanes)``: ``a[i]`` in every lane (a broadcast load);
* ``vzero(sample, lanes)``, ``vfma(a, b, c)`` (``a * b + c`` per lane, fused),
  ``vadd``, ``vsum`` (horizontal sum);
* ``prefetch(a, i, locality)``: a cache hint for the line holding ``a[i]``;
* ``fetch_add(a, i, v)``, ``atomic_load(a, i)``: sequentially consistent atomics
  on an int64 array, for sharing work between threads;
* ``address_as_voidptr(addr)``: an integer address as a ``void*`` for ``numba.carray``;
* ``transpose_copy(src, s0, s_ld, dst, d0, d_ld, n)``: an ``n x n`` tile copied
  transposed through registers;
* ``native_lanes(a)``, ``vload_native(a, i)``, ``vfill_native(a, value)``: full-width
  vectors of an array's dtype, for code that is generic over the dtype.

16-bit floats travel as integer arrays, since numba has no CPU float16 or bfloat16
type: a ``uint16`` array holds bfloat16 bit patterns and an ``int16`` array IEEE
float16 ones (:data:`BFLOAT16`, :data:`FLOAT16`).  Loads and broadcasts from them
widen to float32 (bfloat16 is the top half of a float32; float16 converts exactly),
stores of float32 vectors into them round to nearest even (NaN stays NaN), so the
arithmetic in between is all float32.  ``sload(a, i)`` / ``sstore(a, i, value)`` are
the scalar forms, identities for float arrays.

``lanes`` must be a compile-time constant (a literal, or a constant propagated into
an ``inline="always"`` function).  None of these check bounds: callers index inside
arrays they validated.  Indices are used as given (no negative-index wraparound), so
the address arithmetic stays simple enough for LLVM to fold into the instructions.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .formats import BFLOAT16, FLOAT16, _compute, _load_values, _store_values, storage_type

__all__ = ["Vector", "BFLOAT16", "FLOAT16", "storage_type", "vload", "vstore", "sload", "sstore", "vsplat", "vzero",
           "vfma", "vadd", "vsum", "prefetch", "fetch_add", "atomic_load", "address_as_voidptr", "transpose_copy",
           "native_lanes", "vload_native", "vfill_native"]


class Vector(types.Type):
    """A SIMD register of ``lanes`` values of ``dtype`` (a numba scalar type)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vector({dtype} x {lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _element_pointer(context, builder, array_type, array, index, index_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [context.cast(builder, index, index_type, types.intp)])


def _lanes(lanes):
    return lanes.literal_value if isinstance(lanes, types.IntegerLiteral) else None


def _splat(builder, scalar, vector_type):
    i32 = ir.IntType(32)
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(i32, 0))
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, vector_type.count), [0] * vector_type.count))


@intrinsic
def vload(typingctx, array, index, lanes):
    if not isinstance(array, types.Array) or _lanes(lanes) is None:
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return _load_values(builder, ptr, sig.args[0].dtype, sig.return_type.lanes,
                            context.get_abi_sizeof(ptr.type.pointee))

    return Vector(_compute(array.dtype), _lanes(lanes))(array, index, lanes), codegen


@intrinsic
def vstore(typingctx, array, index, vector):
    if not isinstance(array, types.Array) or not isinstance(vector, Vector) \
            or vector.dtype != _compute(array.dtype):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        _store_values(builder, args[2], ptr, sig.args[0].dtype, context.get_abi_sizeof(ptr.type.pointee))
        return context.get_dummy_value()

    return types.none(array, index, vector), codegen


@intrinsic
def sload(typingctx, array, index):
    """``array[index]`` in the compute type (float32 for 16-bit storage)."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return _load_values(builder, ptr, sig.args[0].dtype, None, context.get_abi_sizeof(ptr.type.pointee))

    return _compute(array.dtype)(array, index), codegen


@intrinsic
def sstore(typingctx, array, index, value):
    """``array[index] = value``, rounded to the storage format (``value`` of the compute type)."""
    if not isinstance(array, types.Array) or not isinstance(value, (types.Float, types.Integer)):
        return None
    compute = _compute(array.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        scalar = context.cast(builder, args[2], sig.args[2], compute)
        _store_values(builder, scalar, ptr, sig.args[0].dtype, context.get_abi_sizeof(ptr.type.pointee))
        return context.get_dummy_value()

    return types.none(array, index, value), codegen


@intrinsic
def vsplat(typingctx, array, index, lanes):
    if not isinstance(array, types.Array) or _lanes(lanes) is None:
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        scalar = _load_values(builder, ptr, sig.args[0].dtype, None, context.get_abi_sizeof(ptr.type.pointee))
        return _splat(builder, scalar, context.get_value_type(sig.return_type))

    return Vector(_compute(array.dtype), _lanes(lanes))(array, index, lanes), codegen


@intrinsic
def vzero(typingctx, sample, lanes):
    """A zero vector of ``sample``'s type (``sample`` is any scalar of the dtype)."""
    if not isinstance(sample, (types.Float, types.Integer)) or _lanes(lanes) is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(sig.return_type), None)

    return Vector(sample, _lanes(lanes))(sample, lanes), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    if not (isinstance(a, Vector) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        vector_type = args[0].type
        bits = 64 if isinstance(vector_type.element, ir.DoubleType) else 32
        name = f"llvm.fma.v{vector_type.count}f{bits}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 3), name)
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    if not (isinstance(a, Vector) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vsum(typingctx, a):
    """Horizontal sum of the lanes (a tree of adds; the order is fixed)."""
    if not isinstance(a, Vector):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        count = value.type.count
        i32 = ir.IntType(32)
        while count > 1:
            half = count // 2
            low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            high = builder.shuffle_vector(value, value,
                                          ir.Constant(ir.VectorType(i32, half), list(range(half, count))))
            value = builder.fadd(low, high)
            count = half
        return builder.extract_element(value, ir.Constant(i32, 0))

    return a.dtype(a), codegen


@intrinsic
def prefetch(typingctx, array, index, locality):
    """Cache hint for the line holding ``array[index]``: locality 3 = L1, 2 = L2, 1 = L3."""
    if not isinstance(array, types.Array) or _lanes(locality) not in (0, 1, 2, 3):
        return None
    level = _lanes(locality)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, level),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(array, index, locality), codegen


@intrinsic
def fetch_add(typingctx, array, index, value):
    """Atomically ``array[index] += value``; returns the previous value (int64 arrays)."""
    if not isinstance(array, types.Array) or array.dtype != types.int64:
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        delta = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, delta, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    if not isinstance(array, types.Array) or array.dtype != types.int64:
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "seq_cst", align=8)

    return types.int64(array, index), codegen


@intrinsic
def address_as_voidptr(typingctx, address):
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(address), codegen


def _transpose_vectors(builder, vectors):
    """The columns of the square tile whose rows are ``vectors`` (n vectors of n lanes):
    log2(n) stages of two-source shuffles, each swapping the off-diagonal sub-blocks of
    a pair of rows."""
    n = len(vectors)
    vectors = list(vectors)
    i32 = ir.IntType(32)
    size = n // 2
    while size >= 1:
        low = ir.Constant(ir.VectorType(i32, n), [j if not j & size else n + j - size for j in range(n)])
        high = ir.Constant(ir.VectorType(i32, n), [j + size if not j & size else n + j for j in range(n)])
        for i in range(n):
            if not i & size:
                a, b = vectors[i], vectors[i + size]
                vectors[i] = builder.shuffle_vector(a, b, low)
                vectors[i + size] = builder.shuffle_vector(a, b, high)
        size //= 2
    return vectors


@intrinsic
def transpose_copy(typingctx, src, s0, s_ld, dst, d0, d_ld, n):
    """``dst[d0 + c*d_ld + r] = src[s0 + r*s_ld + c]`` for ``r, c < n`` (a power of two,
    compile-time constant): n vector loads, an in-register transpose, n vector stores
    (either side may be 16-bit storage of the other's float32: converted on the way)."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and _compute(src.dtype) == _compute(dst.dtype)):
        return None
    count = _lanes(n)
    if count is None or count < 2 or count & (count - 1):
        return None

    def codegen(context, builder, sig, args):
        def row_pointer(array_type, array, base, base_type, stride, stride_type, r):
            offset = builder.add(context.cast(builder, base, base_type, types.intp),
                                 builder.mul(context.cast(builder, stride, stride_type, types.intp),
                                             ir.Constant(ir.IntType(64), r)))
            return _element_pointer(context, builder, array_type, array, offset, types.intp)

        src_align = context.get_abi_sizeof(context.get_value_type(sig.args[0].dtype))
        dst_align = context.get_abi_sizeof(context.get_value_type(sig.args[3].dtype))
        rows = [_load_values(builder, row_pointer(sig.args[0], args[0], args[1], sig.args[1], args[2], sig.args[2], r),
                             sig.args[0].dtype, count, src_align) for r in range(count)]
        for c, column in enumerate(_transpose_vectors(builder, rows)):
            _store_values(builder, column,
                          row_pointer(sig.args[3], args[3], args[4], sig.args[4], args[5], sig.args[5], c),
                          sig.args[3].dtype, dst_align)
        return context.get_dummy_value()

    return types.none(src, s0, s_ld, dst, d0, d_ld, n), codegen


def _native_lanes(dtype) -> int:
    from . import VECTOR_BYTES

    return max(1, VECTOR_BYTES // (dtype.bitwidth // 8))


@intrinsic
def native_lanes(typingctx, array):
    """Lanes of a full-width vector of ``array``'s dtype (a compile-time constant)."""
    if not isinstance(array, types.Array):
        return None
    lanes = _native_lanes(array.dtype)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, lanes)

    return types.intp(array), codegen


@intrinsic
def vload_native(typingctx, array, index):
    """``vload(array, index, native_lanes(array))``."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vector_type = context.get_value_type(sig.return_type)
        return builder.load(builder.bitcast(ptr, vector_type.as_pointer()),
                            align=context.get_abi_sizeof(ptr.type.pointee))

    return Vector(array.dtype, _native_lanes(array.dtype))(array, index), codegen


@intrinsic
def vfill_native(typingctx, array, value):
    """A full-width vector of ``array``'s dtype with ``value`` in every lane."""
    if not isinstance(array, types.Array):
        return None
    vt = Vector(array.dtype, _native_lanes(array.dtype))

    def codegen(context, builder, sig, args):
        scalar = context.cast(builder, args[1], sig.args[1], sig.args[0].dtype)
        return _splat(builder, scalar, context.get_value_type(sig.return_type))

    return vt(array, value), codegen
