"""Programs around the conv kernels of :mod:`.conv_kernels`, so that they run on
torch's OpenMP team like the matmul programs (:mod:`.runtime`).

A program is a ``numba.cfunc`` taking one N-D argument block (:mod:`.args`): it reads
the kernel's arrays and scalars back from the block and calls the kernel, whose task
loop shares the work with every other thread running the program.  One program per
kernel and dtype, built on first use and cached by numba.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, types

from . import runtime
from .args import make_nd_block, nd_arg1, nd_arg2, nd_arg3, nd_arg4, nd_arg5, nd_scalar
from .conv_kernels import _gather_conv, _images_last, _pack_weights, _to_channels_last, _weight_grad

_SIGNATURE = types.void(types.voidptr)
_BLOCK = 160   # int64 slots a program reads (the largest block, the gather's, has 141)
I32, I64 = np.int32, np.int64


@functools.lru_cache(maxsize=None)
def program(name: str, dtype_name: str):
    """The program of kernel ``name`` for float ``dtype_name``."""
    DT = np.dtype(dtype_name).type
    if name == "channels_last":
        @cfunc(_SIGNATURE, cache=True)
        def channels_last(data):
            b = carray(data, (_BLOCK,), dtype=np.int64)
            _to_channels_last(nd_arg4(b, 0, DT), nd_arg4(b, 1, DT), nd_arg1(b, 2, I64))
        return channels_last
    if name == "pack_weights":
        @cfunc(_SIGNATURE, cache=True)
        def pack_weights(data):
            b = carray(data, (_BLOCK,), dtype=np.int64)
            _pack_weights(nd_arg5(b, 0, DT), nd_arg1(b, 1, I32), nd_arg1(b, 2, I32), nd_arg2(b, 3, I64),
                          nd_arg2(b, 4, I64), nd_arg1(b, 5, I64), nd_scalar(b, 8, 0), nd_arg4(b, 6, DT),
                          nd_arg1(b, 7, I64))
        return pack_weights
    if name == "gather":
        @cfunc(_SIGNATURE, cache=True)
        def gather(data):
            b = carray(data, (_BLOCK,), dtype=np.int64)
            _gather_conv(nd_arg4(b, 0, DT), nd_arg1(b, 1, DT), nd_arg4(b, 2, DT), nd_arg1(b, 3, I32),
                         nd_arg1(b, 4, I32), nd_arg1(b, 5, I64), nd_arg1(b, 6, I64), nd_arg1(b, 7, I64),
                         nd_arg1(b, 8, I64), nd_arg1(b, 9, I64), nd_arg2(b, 10, I64), nd_arg2(b, 11, I64),
                         nd_scalar(b, 22, 0), nd_scalar(b, 22, 1), nd_scalar(b, 22, 2), nd_scalar(b, 22, 3),
                         nd_scalar(b, 22, 4), nd_arg4(b, 12, DT), nd_arg1(b, 13, DT), nd_arg3(b, 14, DT),
                         nd_arg2(b, 15, DT), nd_arg2(b, 16, DT), nd_arg3(b, 17, DT), nd_arg3(b, 18, DT),
                         nd_arg2(b, 19, I64), nd_arg3(b, 20, I64), nd_arg1(b, 21, I64))
        return gather
    if name == "images_last":
        @cfunc(_SIGNATURE, cache=True)
        def images_last(data):
            b = carray(data, (_BLOCK,), dtype=np.int64)
            _images_last(nd_arg3(b, 0, DT), nd_arg1(b, 1, DT), nd_arg1(b, 2, I64))
        return images_last
    if name == "weight_grad":
        @cfunc(_SIGNATURE, cache=True)
        def weight_grad(data):
            b = carray(data, (_BLOCK,), dtype=np.int64)
            _weight_grad(nd_arg4(b, 0, DT), nd_arg1(b, 1, DT), nd_arg2(b, 2, DT), nd_arg1(b, 3, I32),
                         nd_arg1(b, 4, I32), nd_arg1(b, 5, I32), nd_scalar(b, 10, 0), nd_scalar(b, 10, 1),
                         nd_scalar(b, 10, 2), nd_scalar(b, 10, 3), nd_scalar(b, 10, 4), nd_scalar(b, 10, 5),
                         nd_scalar(b, 10, 6), nd_scalar(b, 10, 7), nd_arg5(b, 6, DT), nd_arg3(b, 7, DT),
                         nd_arg2(b, 8, DT), nd_arg1(b, 9, I64))
        return weight_grad
    raise ValueError(f"unknown conv kernel {name!r}")


def run(name: str, arrays, scalars, threads: int) -> None:
    """Run kernel ``name`` on ``threads`` threads.  ``arrays``: the kernel's array
    arguments in the order its program reads them, C-contiguous numpy arrays (float
    ones of one dtype, index tables int32, the rest int64), without the counter, which
    is added last; ``scalars``: its integer arguments."""
    counter = np.zeros(2, dtype=np.int64)
    arrays = (*arrays, counter)
    block, address = make_nd_block(arrays, scalars)
    runtime._launch(program(name, arrays[0].dtype.name), address, threads)
