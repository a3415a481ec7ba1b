"""The LSTM cell's elementwise work on CPUs: forward (float32) and backward (float32
and float64) steps as ``numba.njit`` loops.

Layout of one time step (C-contiguous numpy arrays, ``H`` hidden units, ``N`` rows)::

    gates  (N, 4H)  activated gates [i | f | g | o]: sigmoid, sigmoid, tanh, sigmoid
    c_prev (N, H)   cell state entering the step
    dh, dc (N, H)   gradients of the loss w.r.t. the step's h and c outputs

Threads take rows from a shared counter (run as programs on torch's threads, see
:mod:`.runtime`); each row's gates go to the row function as 1-D arrays, whose loop
over hidden units LLVM vectorizes (indexing the 2-D rows in one loop defeats it: 3.5x
slower).  Float32 uses :func:`~.fast_exp.exp_approx` for sigmoid and tanh.  The
backward step recomputes the new cell state and its tanh from the saved gates and
``c_prev`` (cheaper than reading them back).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, njit, types

from . import runtime
from .args import HEADER, ND_SLOTS, make_nd_block, nd_arg1, nd_arg2, nd_scalar
from .fast_exp import constant_like, exp_approx
from .notice import compiling
from .simd import fetch_add

__all__ = ["cell_backward", "cell_forward", "run"]

# fast-math without "no NaNs" and "no infs": a NaN or inf must come out as nn.LSTM's would
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _cell_row(i_, f_, g_, o_, c_prev, dh, dc, di, df, dg, do):
    one = constant_like(dh, 1)
    two = constant_like(dh, 2)
    for j in range(dh.shape[0]):
        i = i_[j]
        f = f_[j]
        g = g_[j]
        o = o_[j]
        t = one - two / (one + exp_approx(two * (f * c_prev[j] + i * g)))   # tanh(c), c as the forward made it
        d_h = dh[j]
        d_c = dc[j] + d_h * o * (one - t * t)
        di[j] = d_c * g * i * (one - i)
        df[j] = d_c * c_prev[j] * f * (one - f)
        dg[j] = d_c * i * (one - g * g)
        do[j] = d_h * t * o * (one - o)
        dc[j] = d_c * f


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def cell_backward(gates, c_prev, dh, dc, dgates, counter):
    """Writes ``dgates (N, 4H)``, the gradient w.r.t. the gate pre-activations, and
    overwrites ``dc`` with the gradient w.r.t. ``c_prev``.  Task: one row, taken from
    ``counter[0]``."""
    n_rows, h = dh.shape
    n = fetch_add(counter, 0, 1)
    while n < n_rows:
        _cell_row(gates[n, :h], gates[n, h:2 * h], gates[n, 2 * h:3 * h], gates[n, 3 * h:], c_prev[n], dh[n], dc[n],
                  dgates[n, :h], dgates[n, h:2 * h], dgates[n, 2 * h:3 * h], dgates[n, 3 * h:])
        n = fetch_add(counter, 0, 1)


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def _cell_row_forward(pre_i, pre_f, pre_g, pre_o, x_i, x_f, x_g, x_o, c_prev, c, h):
    one = constant_like(c, 1)
    two = constant_like(c, 2)
    for j in range(c.shape[0]):
        i = one / (one + exp_approx(-(pre_i[j] + x_i[j])))
        f = one / (one + exp_approx(-(pre_f[j] + x_f[j])))
        g = one - two / (one + exp_approx(two * (pre_g[j] + x_g[j])))
        o = one / (one + exp_approx(-(pre_o[j] + x_o[j])))
        pre_i[j] = i
        pre_f[j] = f
        pre_g[j] = g
        pre_o[j] = o
        c_new = f * c_prev[j] + i * g
        c[j] = c_new
        h[j] = o * (one - two / (one + exp_approx(two * c_new)))


@njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
def cell_forward(gates, gx, c_prev, c, h, counter):
    """One step: ``gates (N, 4H)`` holds ``h_prev @ W`` on entry and the activated gates
    on return (``gx (N, 4H)`` added first); writes ``c`` and ``h`` ``(N, H)``.  Task: one
    row, taken from ``counter[0]``."""
    n_rows, hidden = c.shape
    n = fetch_add(counter, 0, 1)
    while n < n_rows:
        _cell_row_forward(gates[n, :hidden], gates[n, hidden:2 * hidden], gates[n, 2 * hidden:3 * hidden],
                          gates[n, 3 * hidden:], gx[n, :hidden], gx[n, hidden:2 * hidden],
                          gx[n, 2 * hidden:3 * hidden], gx[n, 3 * hidden:], c_prev[n], c[n], h[n])
        n = fetch_add(counter, 0, 1)


# ------------------------------------------------------------------ programs
_SIGNATURE = types.void(types.voidptr)
_BLOCK = HEADER + ND_SLOTS * 6 + 1


@functools.lru_cache(maxsize=None)
def program(dtype_name: str):
    """The ``numba.cfunc`` program (:mod:`.runtime`) of both cell kernels for float
    ``dtype_name``; the block's scalar picks ``cell_forward`` (0) or ``cell_backward`` (1).
    The kernels are called by their global names: a cfunc closing over a dispatcher
    would get a new cache key in every process and be compiled again each time."""
    DT = np.dtype(dtype_name).type

    @cfunc(_SIGNATURE, cache=True)
    def run_cell(data):
        b = carray(data, (_BLOCK,), dtype=np.int64)
        a0, a1, a2, a3, a4 = nd_arg2(b, 0, DT), nd_arg2(b, 1, DT), nd_arg2(b, 2, DT), nd_arg2(b, 3, DT), \
            nd_arg2(b, 4, DT)
        counter = nd_arg1(b, 5, np.int64)
        if nd_scalar(b, 6, 0) == 0:
            cell_forward(a0, a1, a2, a3, a4, counter)
        else:
            cell_backward(a0, a1, a2, a3, a4, counter)
    return run_cell


_CELL_IDS = {"cell_forward": 0, "cell_backward": 1}


def run(name: str, arrays, threads: int) -> None:
    """Run ``cell_forward`` or ``cell_backward`` on ``arrays`` (its five 2-D arrays, C-contiguous
    numpy arrays of one float dtype, in its argument order) on ``threads`` threads."""
    counter = np.zeros(2, dtype=np.int64)
    if name not in _CELL_IDS:
        raise ValueError(f"unknown LSTM cell kernel {name!r}")
    block, address = make_nd_block((*arrays, counter), (_CELL_IDS[name],))
    with compiling(("lstm_cell", arrays[0].dtype.name), "the CPU LSTM cell kernels"):
        found = program(arrays[0].dtype.name)
    runtime._launch(found, address, threads)
