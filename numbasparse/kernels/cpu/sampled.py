"""Sampled matmul on CPUs: each row of ``x`` times a few column blocks of a dense weight.

Shapes (float32 or float64, C-contiguous numpy arrays; ids int64)::

    x       (N, C)
    active  (N, A)   output-block ids in [0, K/B); pair p = n*A + k is row n's k-th block
    w       the weight W (C, K), held one of two ways:
              "cols": wt (K, C) = W.T, C-contiguous (nn.Linear's weight): block a is
                      the contiguous slab wt[aB:(a+1)B, :]
              "rows": w (C, K), C-contiguous: block a is w[:, aB:(a+1)B]
    y       (N*A, B) y[p, j] = sum_c x[n, c] * W[c, a*B + j],  a = active[n, k]

Pairs are grouped by block (:func:`group_pairs`): ``pairs`` lists the pair indices
sorted by block, ``group_ptr`` the start of each group and ``group_block`` its block.
A task is one group: the block's weights are read once per call, however many rows
chose it, and every task owns its outputs (no atomics; the result does not depend on
the thread count).  Threads take groups from a shared counter (programs on torch's
threads, :mod:`.runtime`); the innermost loops run over ``C`` (or ``B``) and are
vectorized by LLVM.

* forward:  y[p, :]            for every pair of the group
* data:     part[p, :] = sum_j dy[p, j] * W[:, aB + j]  (the caller sums part over k)
* weight:   dW[:, aB:(a+1)B]  += x[n, :]^T dy[p, :] over the group's pairs, written to
            output block ``out_block[g]`` (= a for a full gradient, g for a compact one)
* both (cols order): data and weight in one sweep, each weight row read once
"""
from __future__ import annotations

import functools

import numpy as np
from numba import carray, cfunc, njit, types

from . import runtime
from .args import HEADER, ND_SLOTS, make_nd_block, nd_arg1, nd_arg2, nd_scalar
from .fast_exp import constant_like
from .notice import compiling
from .simd import fetch_add

__all__ = ["group_pairs", "run", "run_backward"]

_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}   # NaN and inf behave as in IEEE
_KERNEL = {"fastmath": _FASTMATH, "cache": True, "error_model": "numpy"}


def group_pairs(active: np.ndarray):
    """``(pairs, group_ptr, group_block)`` (int64) of ``active (N, A)``: pair indices sorted
    by block (stable: rows in order within a block), each group's start (and the end),
    each group's block id."""
    flat = active.reshape(-1)
    pairs = np.argsort(flat, kind="stable").astype(np.int64)
    ordered = flat[pairs]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if ordered.size else np.zeros(0, np.int64)
    group_ptr = np.append(starts, ordered.size).astype(np.int64)
    return pairs, group_ptr, ordered[starts].astype(np.int64)


# ------------------------------------------------------------------ forward
@njit(**_KERNEL)
def _forward_cols(x, wt, pairs, group_ptr, group_block, y, counter, n_active, block):
    n_groups = group_block.shape[0]
    zero = constant_like(x, 0)
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = group_block[g] * block
        for j in range(0, block, 4):   # four weight rows share each load of x
            w0, w1, w2, w3 = wt[base + j], wt[base + j + 1], wt[base + j + 2], wt[base + j + 3]
            for q in range(group_ptr[g], group_ptr[g + 1]):
                p = pairs[q]
                xr = x[p // n_active]
                s0 = s1 = s2 = s3 = zero
                for c in range(xr.shape[0]):
                    v = xr[c]
                    s0 += v * w0[c]
                    s1 += v * w1[c]
                    s2 += v * w2[c]
                    s3 += v * w3[c]
                y[p, j] = s0
                y[p, j + 1] = s1
                y[p, j + 2] = s2
                y[p, j + 3] = s3
        g = fetch_add(counter, 0, 1)


@njit(**_KERNEL)
def _forward_rows(x, w, pairs, group_ptr, group_block, y, counter, n_active, block):
    n_groups = group_block.shape[0]
    acc = np.empty(block, dtype=y.dtype)
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = group_block[g] * block
        for q in range(group_ptr[g], group_ptr[g + 1]):
            p = pairs[q]
            xr = x[p // n_active]
            acc[:] = 0
            for c in range(xr.shape[0]):
                v = xr[c]
                wr = w[c, base:base + block]
                for j in range(block):
                    acc[j] += v * wr[j]
            y[p, :] = acc
        g = fetch_add(counter, 0, 1)


# ------------------------------------------------------------------ data gradient
@njit(**_KERNEL)
def _data_cols(dy, wt, pairs, group_ptr, group_block, part, counter, n_active, block):
    n_groups = group_block.shape[0]
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = group_block[g] * block
        for q in range(group_ptr[g], group_ptr[g + 1]):
            p = pairs[q]
            out = part[p]
            out[:] = 0
            for j in range(block):
                d = dy[p, j]
                wr = wt[base + j]
                for c in range(out.shape[0]):
                    out[c] += d * wr[c]
        g = fetch_add(counter, 0, 1)


@njit(**_KERNEL)
def _data_rows(dy, w, pairs, group_ptr, group_block, part, counter, n_active, block):
    n_groups = group_block.shape[0]
    zero = constant_like(dy, 0)
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = group_block[g] * block
        for q in range(group_ptr[g], group_ptr[g + 1]):
            p = pairs[q]
            d = dy[p]
            for c in range(part.shape[1]):
                wr = w[c, base:base + block]
                s = zero
                for j in range(block):
                    s += d[j] * wr[j]
                part[p, c] = s
        g = fetch_add(counter, 0, 1)


# ------------------------------------------------------------------ weight gradient
@njit(**_KERNEL)
def _weight_cols(x, dy, pairs, group_ptr, out_block, dwt, counter, n_active, block):
    """dwt (rows, C): rows out_block[g]*B .. +B get the group's gradient (overwritten)."""
    n_groups = out_block.shape[0]
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = out_block[g] * block
        for j in range(block):
            out = dwt[base + j]
            out[:] = 0
            for q in range(group_ptr[g], group_ptr[g + 1]):
                p = pairs[q]
                d = dy[p, j]
                xr = x[p // n_active]
                for c in range(out.shape[0]):
                    out[c] += d * xr[c]
        g = fetch_add(counter, 0, 1)


@njit(**_KERNEL)
def _weight_rows(x, dy, pairs, group_ptr, out_block, dw, counter, n_active, block):
    """dw (C, cols): columns out_block[g]*B .. +B get the group's gradient (overwritten)."""
    n_groups = out_block.shape[0]
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = out_block[g] * block
        for c in range(dw.shape[0]):
            out = dw[c, base:base + block]
            out[:] = 0
            for q in range(group_ptr[g], group_ptr[g + 1]):
                p = pairs[q]
                v = x[p // n_active, c]
                d = dy[p]
                for j in range(block):
                    out[j] += v * d[j]
        g = fetch_add(counter, 0, 1)


@njit(**_KERNEL)
def _backward_cols(x, dy, wt, pairs, group_ptr, group_block, out_block, part, dwt, counter, n_active, block):
    """Data and weight gradient in one sweep over each chosen block (cols order): ``part``
    as :func:`_data_cols` writes it and ``dwt`` as :func:`_weight_cols` does, each weight
    row read once for both."""
    n_groups = group_block.shape[0]
    g = fetch_add(counter, 0, 1)
    while g < n_groups:
        base = group_block[g] * block
        out_base = out_block[g] * block
        for q in range(group_ptr[g], group_ptr[g + 1]):
            part[pairs[q]][:] = 0
        for j in range(block):
            wr = wt[base + j]
            out = dwt[out_base + j]
            out[:] = 0
            for q in range(group_ptr[g], group_ptr[g + 1]):
                p = pairs[q]
                d = dy[p, j]
                xr = x[p // n_active]
                pr = part[p]
                for c in range(out.shape[0]):
                    pr[c] += d * wr[c]
                    out[c] += d * xr[c]
        g = fetch_add(counter, 0, 1)


_KERNEL_IDS = {("forward", "cols"): 0, ("forward", "rows"): 1, ("data", "cols"): 2, ("data", "rows"): 3,
               ("weight", "cols"): 4, ("weight", "rows"): 5}

# ------------------------------------------------------------------ programs
_SIGNATURE = types.void(types.voidptr)
_BLOCK = HEADER + ND_SLOTS * 7 + 3


@functools.lru_cache(maxsize=None)
def program(dtype_name: str):
    """The ``numba.cfunc`` program (:mod:`.runtime`) of the six kernels for float
    ``dtype_name``; the block's third scalar picks the kernel (``_KERNEL_IDS``).  The
    kernels are called by their global names: a cfunc closing over a dispatcher would
    get a new cache key in every process and be compiled again each time."""
    DT = np.dtype(dtype_name).type
    I64 = np.int64

    @cfunc(_SIGNATURE, cache=True)
    def run_kernel(data):
        b = carray(data, (_BLOCK,), dtype=np.int64)
        first, second, out = nd_arg2(b, 0, DT), nd_arg2(b, 1, DT), nd_arg2(b, 5, DT)
        pairs, group_ptr, groups, counter = nd_arg1(b, 2, I64), nd_arg1(b, 3, I64), nd_arg1(b, 4, I64), \
            nd_arg1(b, 6, I64)
        n_active, block, which = nd_scalar(b, 7, 0), nd_scalar(b, 7, 1), nd_scalar(b, 7, 2)
        if which == 0:
            _forward_cols(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
        elif which == 1:
            _forward_rows(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
        elif which == 2:
            _data_cols(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
        elif which == 3:
            _data_rows(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
        elif which == 4:
            _weight_cols(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
        else:
            _weight_rows(first, second, pairs, group_ptr, groups, out, counter, n_active, block)
    return run_kernel


@functools.lru_cache(maxsize=None)
def _backward_program(dtype_name: str):
    DT = np.dtype(dtype_name).type
    I64 = np.int64
    size = HEADER + ND_SLOTS * 10 + 2

    @cfunc(_SIGNATURE, cache=True)
    def run_backward(data):
        b = carray(data, (size,), dtype=np.int64)
        _backward_cols(nd_arg2(b, 0, DT), nd_arg2(b, 1, DT), nd_arg2(b, 2, DT), nd_arg1(b, 3, I64),
                       nd_arg1(b, 4, I64), nd_arg1(b, 5, I64), nd_arg1(b, 6, I64), nd_arg2(b, 7, DT),
                       nd_arg2(b, 8, DT), nd_arg1(b, 9, I64), nd_scalar(b, 10, 0), nd_scalar(b, 10, 1))
    return run_backward


def run_backward(x, dy, wt, pairs, group_ptr, group_block, out_block, part, dwt, n_active: int, block: int) -> None:
    """Both gradients of the cols order in one sweep (:func:`_backward_cols`)."""
    counter = np.zeros(2, dtype=np.int64)
    work = 4.0 * pairs.shape[0] * block * x.shape[1]
    threads = min(max(1, group_block.shape[0]), runtime.threads_for(work))
    arrays = (x, dy, wt, pairs, group_ptr, group_block, out_block, part, dwt, counter)
    block_args, address = make_nd_block(arrays, (n_active, block))
    with compiling(("sampled", "backward", x.dtype.name), "the CPU sampled-matmul kernels"):
        found = _backward_program(x.dtype.name)
    runtime._launch(found, address, threads)


def run(kind: str, order: str, first, second, pairs, group_ptr, groups, out, n_active: int, block: int) -> None:
    """Run kernel ``kind`` ("forward", "data", "weight") for weight order ``order``
    ("cols", "rows") with its arguments as in the module docstring (``groups``:
    group_block, or out_block for "weight"; every array C-contiguous, the float ones of
    one dtype, ``first`` and ``second`` 2-D)."""
    counter = np.zeros(2, dtype=np.int64)
    work = 2.0 * pairs.shape[0] * block * (first.shape[1] if kind != "data" else out.shape[1])
    threads = min(max(1, groups.shape[0]), runtime.threads_for(work))
    block_args, address = make_nd_block((first, second, pairs, group_ptr, groups, out, counter),
                                        (n_active, block, _KERNEL_IDS[(kind, order)]))
    with compiling(("sampled", first.dtype.name), "the CPU sampled-matmul kernels"):
        found = program(first.dtype.name)
    runtime._launch(found, address, threads)
