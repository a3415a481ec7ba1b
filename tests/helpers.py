"""Shared reference helpers for the block-sparse matmul tests.

The references here are deliberately independent of the package: the dense weight is
assembled block by block from the mask and the slot numbers the *test* chose (never from
the layout's kernel tables, nor with ``numbasparse.nn.blocks_to_dense``), and all
reference arithmetic is float64.
"""
from __future__ import annotations

import multiprocessing
import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1, but pytest's ``filterwarnings`` ini
    # option (setup.cfg names numba.core.errors.NumbaPerformanceWarning) imports numba
    # before any conftest runs, so numba's config has already been read without it.
    # Re-read it while numba.cuda is still unimported, so that simulate_cuda() works.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    if "numba.cuda" not in sys.modules:
        import numba.core.config as _numba_config

        _numba_config.reload_config()

from numbasparse import BlockLayout  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ------------------------------------------------------------------ random inputs
def randn(shape, dtype=torch.float32, seed=0, requires_grad=False):
    """Standard normal tensor from a private generator (never zeros, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


# ------------------------------------------------------------------ layouts
def mask_with_empty(in_blocks, out_blocks, empty_row, empty_col, density=0.6, seed=0):
    """Random 0/1 mask with block row ``empty_row`` and block column ``empty_col`` all
    zero, and every *other* block row and block column holding at least one live block."""
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < density
    rows = [i for i in range(in_blocks) if i != empty_row]
    cols = [j for j in range(out_blocks) if j != empty_col]
    # a "diagonal" through the non-empty rows/cols guarantees every one of them is live
    for k in range(max(len(rows), len(cols))):
        mask[rows[k % len(rows)], cols[k % len(cols)]] = True
    if empty_row is not None:
        mask[empty_row, :] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    return mask


def permuted_layout(mask, extra=3, seed=0):
    """BlockLayout of ``mask`` whose live blocks sit in randomly permuted slots of a
    storage with ``extra`` dead slots (capacity = nnz + extra).

    Returns ``(layout, slots, capacity)`` with ``slots`` in row-major order of the live
    entries, as chosen by the test.
    """
    mask = np.asarray(mask, dtype=bool)
    nnz = int(mask.sum())
    capacity = nnz + extra
    rng = np.random.default_rng(seed)
    slots = rng.permutation(capacity)[:nnz].astype(np.int64)
    return BlockLayout(mask, slots=slots.copy(), capacity=capacity), slots, capacity


def default_slots(mask):
    return np.arange(int(np.asarray(mask, dtype=bool).sum()), dtype=np.int64)


def dead_slots(slots, capacity):
    return np.setdiff1d(np.arange(capacity), np.asarray(slots))


# ------------------------------------------------------------------ references
def dense_reference(w, mask, slots, block_size):
    """Dense float64 ``(in_blocks*B, out_blocks*B)`` weight from blocks ``w (capacity, B, B)``.

    ``slots[e]`` is the storage slot of the e-th live entry of ``mask`` in row-major
    order.  Differentiable in ``w`` (built with ``torch.cat``).
    """
    mask = np.asarray(mask, dtype=bool)
    B = block_size
    w64 = w.to(torch.float64)
    zero = w64.new_zeros(B, B)
    slot = {}
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        slot[(int(i), int(j))] = int(s)
    rows = []
    for i in range(mask.shape[0]):
        rows.append(torch.cat([w64[slot[(i, j)]] if (i, j) in slot else zero
                               for j in range(mask.shape[1])], dim=1))
    return torch.cat(rows, dim=0)


def dense_reference_numpy(w, mask, slots, block_size):
    """Same as :func:`dense_reference` for large layouts: float64 numpy, not differentiable."""
    mask = np.asarray(mask, dtype=bool)
    B = block_size
    w64 = w.detach().to(torch.float64).cpu().numpy()
    out = np.zeros((mask.shape[0] * B, mask.shape[1] * B))
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        out[i * B:(i + 1) * B, j * B:(j + 1) * B] = w64[s]
    return out


def reference_matmul(x, w, mask, slots, block_size, dy=None):
    """float64 ``x @ W`` and, when ``dy`` is given, the float64 gradients ``(dx, dw)``
    obtained by autograd through the dense reference."""
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    w64 = w.detach().to(torch.float64).requires_grad_(True)
    y = x64 @ dense_reference(w64, mask, slots, block_size)
    if dy is None:
        return y.detach()
    dx, dw = torch.autograd.grad(y, (x64, w64), dy.detach().to(torch.float64), allow_unused=True)
    dx = torch.zeros_like(x64) if dx is None else dx   # a layout without live blocks
    dw = torch.zeros_like(w64) if dw is None else dw
    return y.detach(), dx, dw


def rel_err(out, ref):
    """max|out - ref| / max|ref| in float64."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the result"
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate reference (all zeros): the comparison would be vacuous"
    return (out - ref).abs().max().item() / scale


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


# ------------------------------------------------------------------ errors
def assert_clean_error(excinfo):
    """The error comes from numbasparse's checks: no numba error type anywhere in the chain."""
    exc = excinfo.value
    while exc is not None:
        assert not type(exc).__module__.startswith("numba"), f"numba error escaped: {exc!r}"
        exc = exc.__cause__ or exc.__context__


def raises(exc_type, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``exc_type`` matching ``match``, from numbasparse's
    own checks; returns the ExceptionInfo."""
    with pytest.raises(exc_type, match=match) as excinfo:
        fn(*args, **kwargs)
    assert_clean_error(excinfo)
    return excinfo


# ------------------------------------------------------------------ processes
def _child(queue, fn, args):
    try:
        queue.put(fn(*args))
    except BaseException as exc:  # reported by the parent
        queue.put(f"child raised {exc!r}")


def run_in_forked_child(fn, *args, timeout=120):
    """``fn(*args)`` in a child process started with ``fork``; its (picklable) result.
    Fails the test when the child raises, dies or hangs."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, fn, args))
    child.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        child.kill()
        raise AssertionError(f"the forked child died or hung (exit code {child.exitcode})") from None
    child.join(timeout=60)
    assert child.exitcode == 0, result
    assert not (isinstance(result, str) and result.startswith("child raised")), result
    return result


# ------------------------------------------------------------------ 16-bit floats
HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]
# max|err| / max|ref|: one rounding of the result (at most 2**-8 of an element for
# bfloat16, 2**-11 for float16) plus the float32 sums' error.
REL_TOL_16 = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def half_randn(shape, dtype, seed, scale=1.0, requires_grad=False):
    """Standard normal values rounded to ``dtype`` (the 16-bit values are the inputs)."""
    return (randn(shape, torch.float64, seed) * scale).to(dtype).requires_grad_(requires_grad)


def check_rel_16(out, ref, dtype, what):
    err = rel_err(out, ref)
    assert err < REL_TOL_16[dtype], f"{what}: relative error {err:.3e} >= {REL_TOL_16[dtype]:.0e} ({dtype})"


def load_example(name: str):
    """The module ``examples/<name>.py`` (examples are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
