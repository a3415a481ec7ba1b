"""The argument block every CPU program takes: one int64 array.

Layout: a header of ``HEADER`` counters, then ``(address, length)`` for each 1-D
array argument, then integer scalars::

    block[0]  next task to hand out        block[1]  threads that joined
    block[2]  packing tasks finished       block[3]  unused
    block[HEADER + 2k], block[HEADER + 2k + 1]  address and length of array k
    block[HEADER + 2 * n_arrays + m]           scalar m

Programs read their arrays back with :func:`array_arg` (a ``numba.carray`` over the
address: no copy).  Programs with multi-dimensional arrays use the N-D layout instead
(:func:`make_nd_block`, ``nd_arg1`` .. ``nd_arg5``, ``nd_scalar``): each array takes
``ND_SLOTS`` slots, its address and its shape.  The Python side builds blocks with :func:`make_block` from
``(address, length)`` pairs (:func:`pair`; cached for layout tables and scratch
buffers, since asking numpy for an address costs a microsecond); every array must
stay alive, and C-contiguous, until the program returns.
"""
from __future__ import annotations

import array

from numba import carray, njit

from .simd import address_as_voidptr

HEADER = 4
NEXT_TASK, JOINED, PACKED = 0, 1, 2
_HEADER_VALUES = [0] * HEADER


@njit(inline="always", cache=True)
def array_arg(block, k, dtype):
    return carray(address_as_voidptr(block[HEADER + 2 * k]), (block[HEADER + 2 * k + 1],), dtype=dtype)


@njit(inline="always", cache=True)
def scalar_arg(block, n_arrays, m):
    return block[HEADER + 2 * n_arrays + m]


def pair(a) -> tuple:
    """``(address, number of elements)`` of a C-contiguous numpy array or torch tensor."""
    data_ptr = getattr(a, "data_ptr", None)
    if data_ptr is not None:
        return data_ptr(), a.numel()
    return a.__array_interface__["data"][0], a.size


def make_block(pairs, scalars) -> tuple:
    """``(block, address)``: the block as an ``array.array`` of int64 and its address."""
    values = _HEADER_VALUES.copy()
    for address, length in pairs:
        values.append(address)
        values.append(length)
    values.extend(scalars)
    block = array.array("q", values)
    return block, block.buffer_info()[0]


# ------------------------------------------------- N-dimensional arguments
#: Slots per array in an N-D block: the address, then up to 5 dimensions.
ND_SLOTS = 6


def make_nd_block(arrays, scalars) -> tuple:
    """``(block, address)`` for arrays of up to 5 dimensions (C-contiguous numpy arrays):
    each takes ``ND_SLOTS`` slots, its address and its shape; scalars follow."""
    values = _HEADER_VALUES.copy()
    for a in arrays:
        shape = a.shape
        values.append(a.__array_interface__["data"][0])
        values.extend(shape)
        values.extend([0] * (ND_SLOTS - 1 - len(shape)))
    values.extend(int(v) for v in scalars)
    block = array.array("q", values)
    return block, block.buffer_info()[0]


@njit(inline="always", cache=True)
def _nd(block, k):
    return HEADER + ND_SLOTS * k


@njit(inline="always", cache=True)
def nd_arg1(block, k, dtype):
    o = _nd(block, k)
    return carray(address_as_voidptr(block[o]), (block[o + 1],), dtype=dtype)


@njit(inline="always", cache=True)
def nd_arg2(block, k, dtype):
    o = _nd(block, k)
    return carray(address_as_voidptr(block[o]), (block[o + 1], block[o + 2]), dtype=dtype)


@njit(inline="always", cache=True)
def nd_arg3(block, k, dtype):
    o = _nd(block, k)
    return carray(address_as_voidptr(block[o]), (block[o + 1], block[o + 2], block[o + 3]), dtype=dtype)


@njit(inline="always", cache=True)
def nd_arg4(block, k, dtype):
    o = _nd(block, k)
    return carray(address_as_voidptr(block[o]), (block[o + 1], block[o + 2], block[o + 3], block[o + 4]),
                  dtype=dtype)


@njit(inline="always", cache=True)
def nd_arg5(block, k, dtype):
    o = _nd(block, k)
    return carray(address_as_voidptr(block[o]),
                  (block[o + 1], block[o + 2], block[o + 3], block[o + 4], block[o + 5]), dtype=dtype)


@njit(inline="always", cache=True)
def nd_scalar(block, n_arrays, m):
    return block[HEADER + ND_SLOTS * n_arrays + m]
