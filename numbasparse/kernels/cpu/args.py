"""The argument block every CPU program takes: one int64 array.

Layout: a header of ``HEADER`` counters, then ``(address, length)`` for each 1-D
array argument, then integer scalars::

    block[0]  next task to hand out        block[1]  threads that joined
    block[2]  packing tasks finished       block[3]  unused
    block[HEADER + 2k], block[HEADER + 2k + 1]  address and length of array k
    block[HEADER + 2 * n_arrays + m]           scalar m

Programs read their arrays back with :func:`array_arg` (a ``numba.carray`` over the
address: no copy).  The Python side builds blocks with :func:`make_block`; every
array must stay alive, and C-contiguous, until the program returns.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit

from .simd import address_as_voidptr

HEADER = 4
NEXT_TASK, JOINED, PACKED = 0, 1, 2


@njit(inline="always", cache=True)
def array_arg(block, k, dtype):
    return carray(address_as_voidptr(block[HEADER + 2 * k]), (block[HEADER + 2 * k + 1],), dtype=dtype)


@njit(inline="always", cache=True)
def scalar_arg(block, n_arrays, m):
    return block[HEADER + 2 * n_arrays + m]


def address(array) -> int:
    """Data address of a C-contiguous numpy array or torch tensor."""
    data_ptr = getattr(array, "data_ptr", None)
    if data_ptr is not None:
        return data_ptr()
    return array.__array_interface__["data"][0]


def make_block(arrays, scalars) -> np.ndarray:
    values = [0] * HEADER
    for a in arrays:
        values.append(address(a))
        values.append(a.size if isinstance(a, np.ndarray) else a.numel())
    values.extend(scalars)
    return np.array(values, dtype=np.int64)
