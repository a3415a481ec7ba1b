"""Adam on selected rows of a parameter (numba): the update behind
:class:`numbasparse.RowSparseAdam`.

Arrays (C-contiguous, float32 or float64; ``rows`` int64)::

    param, exp_avg, exp_avg_sq  (R, F)  the parameter viewed as rows, and its moments
    rows                        (U,)    the rows to update (distinct)
    grad                        (U, F)  their gradients, grad[i] for row rows[i]
    hyper                       (4,)    float64: step size (bias-corrected), beta1, beta2, eps

Task: a chunk of ``CHUNK`` rows, taken from a shared counter by the threads running the
program (:mod:`.runtime`); the loop over a row's ``F`` values is vectorized by LLVM.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import carray, cfunc, njit, types

from . import runtime
from .args import HEADER, ND_SLOTS, make_nd_block, nd_arg1, nd_arg2
from .fast_exp import constant_like
from .notice import compiling
from .simd import fetch_add

__all__ = ["run"]

CHUNK = 64
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _row(p, m, v, g, step, beta1, beta2, eps):
    one = constant_like(p, 1)
    for c in range(p.shape[0]):
        gc = g[c]
        mc = beta1 * m[c] + (one - beta1) * gc
        vc = beta2 * v[c] + (one - beta2) * gc * gc
        m[c] = mc
        v[c] = vc
        p[c] -= step * mc / (math.sqrt(vc) + eps)


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _adam_rows(param, exp_avg, exp_avg_sq, rows, grad, hyper, counter):
    n = rows.shape[0]
    step = constant_like(param, hyper[0])
    beta1 = constant_like(param, hyper[1])
    beta2 = constant_like(param, hyper[2])
    eps = constant_like(param, hyper[3])
    chunk = fetch_add(counter, 0, 1)
    while chunk * CHUNK < n:
        for i in range(chunk * CHUNK, min(n, (chunk + 1) * CHUNK)):
            r = rows[i]
            _row(param[r], exp_avg[r], exp_avg_sq[r], grad[i], step, beta1, beta2, eps)
        chunk = fetch_add(counter, 0, 1)


_SIGNATURE = types.void(types.voidptr)
_BLOCK = HEADER + ND_SLOTS * 7


@functools.lru_cache(maxsize=None)
def _program(dtype_name: str):
    DT = np.dtype(dtype_name).type

    @cfunc(_SIGNATURE, cache=True)
    def adam_rows(data):
        b = carray(data, (_BLOCK,), dtype=np.int64)
        _adam_rows(nd_arg2(b, 0, DT), nd_arg2(b, 1, DT), nd_arg2(b, 2, DT), nd_arg1(b, 3, np.int64),
                   nd_arg2(b, 4, DT), nd_arg1(b, 5, np.float64), nd_arg1(b, 6, np.int64))
    return adam_rows


def run(param, exp_avg, exp_avg_sq, rows, grad, step: float, beta1: float, beta2: float, eps: float) -> None:
    """Update ``param``'s ``rows`` in place (numpy arrays as in the module docstring)."""
    counter = np.zeros(2, dtype=np.int64)
    hyper = np.array([step, beta1, beta2, eps], dtype=np.float64)
    threads = runtime.threads_for(10.0 * grad.size, 28.0 * grad.size)
    threads = min(threads, max(1, -(-rows.shape[0] // CHUNK)))
    block, address = make_nd_block((param, exp_avg, exp_avg_sq, rows, grad, hyper, counter), ())
    with compiling(("row_adam", param.dtype.name), "the CPU row Adam kernel"):
        found = _program(param.dtype.name)
    runtime._launch(found, address, threads)
