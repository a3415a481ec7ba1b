"""Every function a user can import checks its arguments before anything reaches a
kernel: the public backend functions (``numbasparse.backend``), the public numba.cuda
wrappers (``numbasparse.kernels.cuda.matmul`` / ``.conv``: shapes, dtypes and every
layout-table value) and the public helpers of ``numbasparse.conv``.  Bad arguments give
a ValueError / TypeError naming the problem, never a numba error; good arguments give
results equal to a float64 dense reference (CPU kernels, CUDA simulator, real GPU).

Kernel launches use one-dimensional grids (``gridDim.y`` stops at 65535): the grid
helpers are checked on the host for sizes the simulator cannot run, the decomposition
of ``blockIdx.x`` under the simulator with several tiles and block columns, and a
layout with more than 65535 block columns on a real GPU.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, mask_with_empty, permuted_layout, raises, randn, reference_matmul, rel_err

from numba import cuda  # noqa: E402  (after helpers: the simulator is configured there)

from numbasparse import BlockLayout, backend  # noqa: E402
from numbasparse.conv import conv_blocks_from_dense, conv_geometry, dense_conv_weight  # noqa: E402
from numbasparse.functional import block_sparse_conv2d  # noqa: E402
from numbasparse.kernels.cuda import conv as cconv  # noqa: E402
from numbasparse.kernels.cuda import host  # noqa: E402
from numbasparse.kernels.cuda import matmul as mm  # noqa: E402

SIMULATOR = cuda.jit.__module__.startswith("numba.cuda.simulator")
simulator = pytest.mark.skipif(not SIMULATOR, reason="needs numba's CUDA simulator (no real GPU)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

B = 8
MASK = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)   # 2 input x 3 output blocks, nnz 4
LAYOUT = BlockLayout(MASK)


# ======================================================== public backend functions
def _x(n=3, features=2 * B, dtype=torch.float32):
    return randn((n, features), dtype, 1)


def _dy(n=3, features=3 * B, dtype=torch.float32):
    return randn((n, features), dtype, 2)


def _w(capacity=4, bs=B, dtype=torch.float32):
    return randn((capacity, bs, bs), dtype, 3)


def _backend_calls(x, dy, w, layout=LAYOUT, bs=B):
    """Every public backend function applied to the arguments it takes."""
    return {
        "forward": lambda: backend.forward(x, w, layout, bs),
        "backward": lambda: backend.backward(dy, x, w, layout, bs),
        "backward_data": lambda: backend.backward_data(dy, w, layout, bs),
        "backward_weight": lambda: backend.backward_weight(x, dy, layout, bs),
    }


# (description, keyword changes, functions affected, exception, message)
BAD_BACKEND_ARGS = [
    ("x features", dict(x=_x(features=3 * B)), ("forward", "backward", "backward_weight"),
     ValueError, r"x has 24 features but the layout has 2 input blocks of size 8 \(16 features\)"),
    ("dy features", dict(dy=_dy(features=2 * B)), ("backward", "backward_data", "backward_weight"),
     ValueError, r"dy has 16 features but the layout has 3 output blocks of size 8 \(24 features\)"),
    ("w capacity", dict(w=_w(capacity=3)), ("forward", "backward", "backward_data"),
     ValueError, r"w must have shape \(nnz, B, B\) = \(4, 8, 8\).*got \(3, 8, 8\)"),
    ("w block", dict(w=_w(bs=16)), ("forward", "backward", "backward_data"),
     ValueError, r"w must have shape \(nnz, B, B\) = \(4, 8, 8\).*got \(4, 16, 16\)"),
    ("x 3-D", dict(x=_x().reshape(3, 2, B)), ("forward", "backward", "backward_weight"),
     ValueError, r"x must be 2-D \(N, features\), got shape \(3, 2, 8\)"),
    ("dy 1-D", dict(dy=_dy()[0]), ("backward", "backward_data", "backward_weight"),
     ValueError, r"dy must be 2-D \(N, features\), got shape \(24,\)"),
    ("row mismatch", dict(x=_x(n=4)), ("backward", "backward_weight"),
     ValueError, r"row mismatch: x has 4 rows, dy has 3"),
    ("x int32", dict(x=_x().int()), ("forward", "backward", "backward_weight"),
     TypeError, r"x has dtype torch.int32; supported dtypes are float32, float64, float16 and bfloat16"),
    ("w float64", dict(w=_w(dtype=torch.float64)), ("forward", "backward", "backward_data"),
     TypeError, r"has dtype torch.float32 but w has dtype torch.float64: use one dtype"),
    ("x on meta", dict(x=torch.empty((3, 2 * B), device="meta")), ("forward", "backward", "backward_weight"),
     ValueError, r"is on .* but .* is on .*: move them to one device"),
    ("x strided", dict(x=_x(features=4 * B)[:, ::2]), ("forward", "backward", "backward_weight"),
     ValueError, r"x must be contiguous"),
    ("w not a tensor", dict(w=np.zeros((4, B, B), np.float32)), ("forward", "backward", "backward_data"),
     TypeError, r"w must be a torch.Tensor, got ndarray"),
    ("block size", dict(bs=4), ("forward", "backward", "backward_data", "backward_weight"),
     ValueError, r"block_size must be one of \(8, 16, 32\), got 4"),
    ("layout a mask", dict(layout=MASK), ("forward", "backward", "backward_data", "backward_weight"),
     TypeError, r"layout must be a BlockLayout, got ndarray"),
]


@pytest.mark.parametrize("use_simulator", [False, pytest.param(True, marks=simulator)], ids=["cpu", "sim"])
@pytest.mark.parametrize("case", BAD_BACKEND_ARGS, ids=[c[0] for c in BAD_BACKEND_ARGS])
def test_backend_rejects_bad_arguments(case, use_simulator):
    _, changes, affected, exc_type, match = case
    args = dict(x=_x(), dy=_dy(), w=_w(), layout=LAYOUT, bs=B)
    args.update(changes)
    calls = _backend_calls(**args)
    with backend.simulate_cuda() if use_simulator else contextlib.nullcontext():
        for name in affected:
            raises(exc_type, match, calls[name])


def test_backend_bias_checked():
    raises(ValueError, r"bias must have shape \(24,\), got \(16,\)",
           backend.forward, _x(), _w(), LAYOUT, B, torch.zeros(2 * B))
    raises(TypeError, r"x has dtype torch.float32 but bias has dtype torch.float64",
           backend.forward, _x(), _w(), LAYOUT, B, torch.zeros(3 * B, dtype=torch.float64))


def test_backend_backward_needs_its_operands():
    raises(TypeError, r"backward needs w to compute dx", backend.backward, _dy(), _x(), None, LAYOUT, B)
    raises(TypeError, r"backward needs x to compute dw", backend.backward, _dy(), None, _w(), LAYOUT, B)


def test_private_entries_stay_private():
    """The unchecked entries are underscored and not exported."""
    for module in (backend, mm, cconv):
        assert not any(name.startswith("_") for name in module.__all__)
        for name in ("forward", "backward_data", "backward_weight"):
            if hasattr(module, name):
                assert name in module.__all__
    assert {"_forward", "_backward"} <= set(dir(backend))
    for module in (mm, cconv):
        assert {"_forward", "_backward_data", "_backward_weight"} <= set(dir(module))


def _backend_case(n, in_blocks, out_blocks, dtype, seed):
    mask = mask_with_empty(in_blocks, out_blocks, in_blocks - 1, 0, density=0.5, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=seed + 1)
    x = randn((n, in_blocks * B), dtype, seed + 2)
    w = randn((capacity, B, B), dtype, seed + 3)
    dy = randn((n, out_blocks * B), dtype, seed + 4)
    bias = randn((out_blocks * B,), dtype, seed + 5)
    return mask, layout, slots, x, w, dy, bias


@pytest.mark.parametrize("use_simulator", [False, pytest.param(True, marks=simulator)], ids=["cpu", "sim"])
@pytest.mark.parametrize("n, dtype", [(1, torch.float32), (37, torch.float64)], ids=["n1-f32", "n37-f64"])
def test_backend_public_results(n, dtype, use_simulator):
    """Fresh random inputs, an empty block row and column, permuted slots with free
    ones; N = 37 spans two CUDA row tiles of 4 block columns (1-D grid decomposition)."""
    mask, layout, slots, x, w, dy, bias = _backend_case(n, 3, 4, dtype, seed=10 * n + int(use_simulator))
    y_ref, dx_ref, dw_ref = reference_matmul(x, w, mask, slots, B, dy)
    with backend.simulate_cuda() if use_simulator else contextlib.nullcontext():
        y = backend.forward(x, w, layout, B)
        yb = backend.forward(x, w, layout, B, bias)
        dx, dw = backend.backward(dy, x, w, layout, B)
        dx1 = backend.backward_data(dy, w, layout, B)
        dw1 = backend.backward_weight(x, dy, layout, B)
    assert_close(y, y_ref, dtype, "y")
    assert_close(yb, y_ref + bias.double(), dtype, "y + bias")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dw, dw_ref, dtype, "dw")
    assert torch.equal(dx1, dx) and torch.equal(dw1, dw)
    assert torch.all(y[:, :B] == 0), "empty block column 0 must be exactly zero"
    assert torch.all(dx[:, -B:] == 0), "empty block row must get an exactly zero gradient"


# ===================================================== public numba.cuda wrappers
def _mm_arrays(layout, n=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, layout.in_blocks * B)).astype(dtype)
    dy = rng.standard_normal((n, layout.out_blocks * B)).astype(dtype)
    w = rng.standard_normal((layout.capacity, B, B)).astype(dtype)
    y = np.full((n, layout.out_blocks * B), np.nan, dtype)
    dx = np.full((n, layout.in_blocks * B), np.nan, dtype)
    dw = np.zeros_like(w)
    return x, dy, w, y, dx, dw


def _tables(layout, names, to_device=False, **replace):
    """The layout's tables ``names`` as fresh arrays (numpy, or device arrays), with
    ``replace`` (name -> array) swapped in."""
    out = []
    for name in names:
        t = np.array(replace.get(name, getattr(layout, name)))
        out.append(cuda.to_device(t) if to_device else t)
    return out


_I32 = np.int32
# (description, table replacements for the col tables, message)
BAD_COL_TABLES = [
    ("row index too large", dict(col_rows=np.array([0, 1, 0, 2], _I32)), r"col indices must lie in \[0, 2\)"),
    ("row index negative", dict(col_rows=np.array([0, 1, -1, 1], _I32)), r"col indices must lie in \[0, 2\)"),
    ("slot too large", dict(col_slots=np.array([0, 2, 4, 3], _I32)), r"col_slots must lie in \[0, 4\)"),
    ("slot negative", dict(col_slots=np.array([0, -2, 1, 3], _I32)), r"col_slots must lie in \[0, 4\)"),
    ("ptr not monotone", dict(col_ptr=np.array([0, 3, 2, 4], _I32)), r"col_ptr must rise monotonically"),
    ("ptr not from 0", dict(col_ptr=np.array([1, 1, 2, 4], _I32)), r"col_ptr must rise monotonically from 0"),
    ("ptr past the end", dict(col_ptr=np.array([0, 1, 2, 5], _I32)), r"col_ptr must rise .* \(4\)"),
    ("ptr too short", dict(col_ptr=np.array([0, 1, 4], _I32)), r"col_ptr has length 3, expected 4"),
    ("slots too short", dict(col_slots=np.array([0, 2, 1], _I32)), r"col_slots has length 3, expected 4"),
    ("float table", dict(col_rows=np.array([0, 1, 0, 1], np.float32)), r"col indices must be an integer array"),
    ("2-D table", dict(col_slots=np.array([[0, 2], [1, 3]], _I32)), r"col_slots must be 1-D"),
]


@simulator
@pytest.mark.parametrize("to_device", [False, True], ids=["numpy", "device"])
@pytest.mark.parametrize("case", BAD_COL_TABLES, ids=[c[0] for c in BAD_COL_TABLES])
def test_cuda_matmul_forward_rejects_bad_tables(case, to_device):
    _, replace, match = case
    x, _, w, y, _, _ = _mm_arrays(LAYOUT)
    exc_type = TypeError if "integer" in match else ValueError
    raises(exc_type, match, mm.forward, x, w, *_tables(LAYOUT, ("col_ptr", "col_rows", "col_slots"), to_device,
                                                       **replace), B, y)
    assert np.all(np.isnan(y)), "nothing may be written when the arguments are rejected"


@simulator
@pytest.mark.parametrize("to_device", [False, True], ids=["numpy", "device"])
def test_cuda_matmul_backward_data_rejects_bad_tables(to_device):
    _, dy, w, _, dx, _ = _mm_arrays(LAYOUT)
    names = ("row_ptr", "row_cols", "row_slots")
    cases = [
        (dict(row_cols=np.array([0, 3, 1, 2], _I32)), r"row indices must lie in \[0, 3\)"),
        (dict(row_slots=np.array([0, 1, 2, 9], _I32)), r"row_slots must lie in \[0, 4\)"),
        (dict(row_ptr=np.array([0, 3, 2], _I32)), r"row_ptr must rise monotonically"),
        (dict(row_ptr=np.array([0, 4], _I32)), r"row_ptr has length 2, expected 3"),
    ]
    for replace, match in cases:
        raises(ValueError, match, mm.backward_data, dy, w, *_tables(LAYOUT, names, to_device, **replace), B, dx)
    assert np.all(np.isnan(dx))


@simulator
@pytest.mark.parametrize("to_device", [False, True], ids=["numpy", "device"])
def test_cuda_matmul_backward_weight_rejects_bad_tables(to_device):
    x, dy, _, _, _, dw = _mm_arrays(LAYOUT)
    dw[:] = 7.0
    names = ("entry_rows", "entry_cols", "entry_slots")
    cases = [
        (dict(entry_rows=np.array([0, 0, 2, 1], _I32)), r"entry_rows must lie in \[0, 2\)"),
        (dict(entry_cols=np.array([0, 3, 1, 2], _I32)), r"entry_cols must lie in \[0, 3\)"),
        (dict(entry_cols=np.array([0, -1, 1, 2], _I32)), r"entry_cols must lie in \[0, 3\)"),
        (dict(entry_slots=np.array([0, 1, 2, 4], _I32)), r"entry_slots must lie in \[0, 4\)"),
        (dict(entry_slots=np.array([0, 1, 2], _I32)), r"entry tables differ in length"),
    ]
    for replace, match in cases:
        raises(ValueError, match, mm.backward_weight, x, dy, *_tables(LAYOUT, names, to_device, **replace), B, dw)
    assert np.all(dw == 7.0)


@simulator
def test_cuda_matmul_rejects_bad_shapes():
    x, dy, w, y, dx, dw = _mm_arrays(LAYOUT)
    col = _tables(LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    row = _tables(LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    ent = _tables(LAYOUT, ("entry_rows", "entry_cols", "entry_slots"))
    raises(ValueError, r"row mismatch: x has 5 rows, y has 4", mm.forward, x, w, *col, B, y[:4])
    raises(ValueError, r"col_ptr has length 4, expected 2", mm.forward, x, w, *col, B, y[:, :B])
    raises(ValueError, r"x has 12 features, not a multiple of block_size 8", mm.forward, x[:, :12].copy(), w,
           *col, B, y)
    raises(ValueError, r"w must have shape \(capacity, 8, 8\), got \(4, 8, 4\)", mm.forward, x,
           w[:, :, :4].copy(), *col, B, y)
    raises(ValueError, r"col indices must lie in \[0, 1\)", mm.forward, x[:, :B].copy(), w, *col, B, y)
    raises(ValueError, r"col_slots must lie in \[0, 3\)", mm.forward, x, w[:3].copy(), *col, B, y)
    raises(ValueError, r"dx must be 2-D, got shape \(5, 16, 1\)", mm.backward_data, dy, w, *row, B, dx[..., None])
    raises(ValueError, r"row mismatch: x has 5 rows, dy has 2", mm.backward_weight, x, dy[:2], *ent, B, dw)
    raises(ValueError, r"entry_cols must lie in \[0, 2\)", mm.backward_weight, x, dy[:, :2 * B].copy(), *ent, B, dw)
    raises(TypeError, r"dtype mismatch: x=float64, w=float32", mm.forward, x, w.astype(np.float32), *col, B, y)
    raises(TypeError, r"only float32, float64 and float16 are supported, got int32", mm.forward, x.astype(np.int32),
           w.astype(np.int32), *col, B, y.astype(np.int32))
    raises(ValueError, r"block_size must be one of \(8, 16, 32\), got 4", mm.forward, x, w, *col, 4, y)
    raises(TypeError, r"must be a numpy array or a CUDA array, got list", mm.forward, x, w, col[0], [0, 1, 0, 1],
           col[2], B, y)
    assert np.all(np.isnan(y)) and np.all(np.isnan(dx)) and np.all(dw == 0)


@simulator
def test_cuda_matmul_grid_decomposition():
    """Public wrappers through the simulator: 37 rows (2 row tiles) x 4 block columns
    (an empty one), 3 block rows (an empty one), permuted slots with free ones."""
    mask = mask_with_empty(3, 4, 1, 2, density=0.5, seed=5)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=6)
    x, dy, w, y, dx, _ = _mm_arrays(layout, n=37, seed=7)
    dw = np.full_like(w, -1.5)
    mm.forward(x, w, *_tables(layout, ("col_ptr", "col_rows", "col_slots")), B, y)
    mm.backward_data(dy, w, *_tables(layout, ("row_ptr", "row_cols", "row_slots")), B, dx)
    mm.backward_weight(x, dy, *_tables(layout, ("entry_rows", "entry_cols", "entry_slots")), B, dw)
    y_ref, dx_ref, dw_ref = reference_matmul(torch.from_numpy(x), torch.from_numpy(w), mask, slots, B,
                                             torch.from_numpy(dy))
    assert_close(torch.from_numpy(y), y_ref, torch.float64, "y")
    assert_close(torch.from_numpy(dx), dx_ref, torch.float64, "dx")
    live = np.asarray(slots)
    assert_close(torch.from_numpy(dw[live]), dw_ref[live], torch.float64, "dw")
    free = np.setdiff1d(np.arange(capacity), live)
    assert np.all(dw[free] == -1.5), "free slots of dw must stay untouched"
    assert np.all(y[:, 2 * B:3 * B] == 0) and np.all(dx[:, B:2 * B] == 0)


# ------------------------------------------------------------------------ conv
CONV_MASK = np.array([[1, 0, 1], [1, 0, 0]], dtype=bool)   # 2 x 3 blocks, column 1 empty, nnz 3
CONV_LAYOUT = BlockLayout(CONV_MASK, slots=[3, 0, 1], capacity=4)
GEOMETRY = ((1, 1), (1, 0), (1, 1))   # stride, padding (1 row at the top and bottom), dilation


def _conv_arrays(layout, n=2, size=(6, 7), kernel=(3, 2), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    kh, kw = kernel
    out = (size[0] + 2 - kh + 1, size[1] - kw + 1)   # padding 1 top and bottom, 0 left and right
    x = rng.standard_normal((n, layout.in_blocks * B, *size)).astype(dtype)
    w = rng.standard_normal((layout.capacity, kh, kw, B, B)).astype(dtype)
    dy = rng.standard_normal((n, layout.out_blocks * B, *out)).astype(dtype)
    return x, w, dy


@simulator
def test_cuda_conv_rejects_bad_arguments():
    x, w, dy = _conv_arrays(CONV_LAYOUT, n=1, size=(3, 3))
    y = np.full(dy.shape, np.nan)
    dx = np.full(x.shape, np.nan)
    dw = np.full(w.shape, 5.0)
    col = _tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    row = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    bad_rows = _tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots"), col_rows=np.array([0, 2, 0], _I32))
    bad_slots = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"), row_slots=np.array([3, 0, 4], _I32))
    bad_ptr = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"), row_ptr=np.array([0, 3, 2], _I32))
    bad_cols = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"), row_cols=np.array([0, 3, 0], _I32),
                       to_device=True)
    raises(ValueError, r"col indices must lie in \[0, 2\)", cconv.forward, x, w, *bad_rows, B, *GEOMETRY, y)
    raises(ValueError, r"row_slots must lie in \[0, 4\)", cconv.backward_data, dy, w, *bad_slots, B, *GEOMETRY, dx)
    raises(ValueError, r"row_ptr must rise monotonically", cconv.backward_weight, x, dy, *bad_ptr, B, *GEOMETRY, dw)
    raises(ValueError, r"row indices must lie in \[0, 3\)", cconv.backward_weight, x, dy, *bad_cols, B, *GEOMETRY,
           dw)
    raises(ValueError, r"col_ptr has length 4, expected 2", cconv.forward, x, w, *col, B, *GEOMETRY, y[:, :B])
    raises(ValueError, r"row_ptr has length 3, expected 2", cconv.backward_weight, x[:, :B], dy, *row, B,
           *GEOMETRY, dw)
    raises(ValueError, r"image count mismatch: x has 1 images, y has 2", cconv.forward, x, w, *col, B, *GEOMETRY,
           np.concatenate([y, y]))
    raises(ValueError, r"x has 12 channels, not a multiple of block_size 8", cconv.forward, x[:, :12].copy(), w,
           *col, B, *GEOMETRY, y)
    raises(ValueError, r"w must have shape \(capacity, kh, kw, 8, 8\)", cconv.forward, x, w[..., :4].copy(), *col, B,
           *GEOMETRY, y)
    raises(ValueError, r"w must be 5-D, got shape \(4, 2, 8, 8\)", cconv.forward, x, w[:, 0].copy(), *col, B,
           *GEOMETRY, y)
    raises(ValueError, r"stride must be a pair of integers >= 1", cconv.forward, x, w, *col, B, (0, 1), (1, 0),
           (1, 1), y)
    raises(ValueError, r"padding must be a pair of integers >= 0", cconv.backward_data, dy, w, *row, B, (1, 1),
           (-1, 0), (1, 1), dx)
    raises(TypeError, r"dtype mismatch", cconv.backward_data, dy, w.astype(np.float32), *row, B, *GEOMETRY, dx)
    assert np.all(np.isnan(y)) and np.all(np.isnan(dx)) and np.all(dw == 5.0)


def _dense_conv_weight_reference(w, mask, slots):
    """float64 ``(out, in, kh, kw)`` weight from blocks ``w (capacity, kh, kw, B, B)`` with
    the test's slots, assembled block by block."""
    w = torch.as_tensor(w, dtype=torch.float64)
    kh, kw = w.shape[1], w.shape[2]
    dense = torch.zeros(mask.shape[1] * B, mask.shape[0] * B, kh, kw, dtype=torch.float64)
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        dense[j * B:(j + 1) * B, i * B:(i + 1) * B] = w[s].permute(3, 2, 0, 1)
    return dense


@simulator
def test_cuda_conv_grid_decomposition():
    """Public conv wrappers through the simulator: 2 images of 6 x 7 pixels (6 x 6
    outputs: 2 pixel tiles each), 3 output block columns (an empty one), a 3 x 2 kernel (6 taps of the
    weight-gradient grid), permuted slots with a free one."""
    slots = [3, 0, 1]
    x, w, dy = _conv_arrays(CONV_LAYOUT, seed=11)
    y = np.full(dy.shape, np.nan)
    dx = np.full(x.shape, np.nan)
    dw = np.full(w.shape, 2.5)
    cconv.forward(x, w, *_tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots")), B, *GEOMETRY, y)
    row = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    cconv.backward_data(dy, w, *row, B, *GEOMETRY, dx)
    cconv.backward_weight(x, dy, *row, B, *GEOMETRY, dw)
    x64 = torch.from_numpy(x).requires_grad_(True)
    w64 = torch.from_numpy(w).requires_grad_(True)
    y_ref = F.conv2d(x64, _dense_conv_weight_reference(w64, CONV_MASK, slots), padding=(1, 0))
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x64, w64), torch.from_numpy(dy))
    assert_close(torch.from_numpy(y), y_ref, torch.float64, "y")
    assert_close(torch.from_numpy(dx), dx_ref, torch.float64, "dx")
    assert_close(torch.from_numpy(dw[slots]), dw_ref[slots], torch.float64, "dw")
    assert np.all(dw[2] == 2.5), "the free slot of dw must stay untouched"
    assert np.all(y[:, B:2 * B] == 0)


# ------------------------------------------------------------ numbasparse.conv helpers
def test_conv_helpers_reject_bad_arguments():
    w = randn((CONV_LAYOUT.capacity, 3, 3, B, B), torch.float32, 1)
    raises(ValueError, r"w must have shape \(capacity, kh, kw, B, B\) = \(4, kh, kw, 8, 8\).*got \(3, 3, 3, 8, 8\)",
           dense_conv_weight, w[:3], CONV_LAYOUT, B)
    raises(ValueError, r"got \(4, 3, 8, 8\)", dense_conv_weight, w[:, 0], CONV_LAYOUT, B)
    raises(ValueError, r"block_size must be one of", dense_conv_weight, w, CONV_LAYOUT, 4)
    raises(TypeError, r"w must be a torch.Tensor, got ndarray", dense_conv_weight, w.numpy(), CONV_LAYOUT, B)
    dense = randn((3 * B, 2 * B, 3, 3), torch.float32, 2)
    raises(ValueError, r"dense must have shape \(out_channels, in_channels, kh, kw\) = \(24, 16, kh, kw\).*"
                       r"got \(16, 24, 3, 3\)", conv_blocks_from_dense, dense.transpose(0, 1), CONV_LAYOUT, B)
    raises(ValueError, r"got \(24, 16, 3\)", conv_blocks_from_dense, dense[..., 0], CONV_LAYOUT, B)
    raises(ValueError, r"kernel_size must be positive", conv_geometry, (5, 5), (0, 3))
    raises(TypeError, r"kernel_size must be an int or a pair of ints", conv_geometry, (5, 5), (1.5, 3))
    raises(ValueError, r"input_size must be non-negative", conv_geometry, (-1, 5), (1, 1))
    raises(ValueError, r"input_size must be an int or a pair of ints, got 3 values", conv_geometry, (4, 4, 4), 3)


def test_conv_helpers_round_trip():
    slots = [3, 0, 1]
    w = randn((CONV_LAYOUT.capacity, 3, 2, B, B), torch.float64, 4)
    dense = dense_conv_weight(w, CONV_LAYOUT, B)
    assert torch.equal(dense, _dense_conv_weight_reference(w, CONV_MASK, slots))
    blocks = conv_blocks_from_dense(dense, CONV_LAYOUT, B)
    assert torch.equal(blocks[slots], w[slots]) and torch.all(blocks[2] == 0)
    assert conv_geometry((5, 4), (3, 2), padding=1).output_size == (5, 5)


# ================================================================= launch grids
WIDE = 70000   # block columns: more than gridDim.y (65535) allows


def test_grids_are_one_dimensional_within_limits():
    for grid, expected in (
            (mm._gather_grid(1000, WIDE), 32 * WIDE),        # 1000 rows: 32 row tiles
            (mm._gather_grid(1, WIDE), WIDE),
            (mm._weight_grid(WIDE * 3), WIDE * 3),
            (cconv._pixel_grid(2, 33, WIDE), 2 * 2 * WIDE),   # 2 images x 2 pixel tiles
            (cconv._weight_grid(WIDE, 9), 9 * WIDE)):
        assert grid == (expected,)
        assert len(grid) == 1 and 0 < grid[0] <= host.MAX_GRID_X
    assert mm._gather_grid(0, WIDE) == (0,) and cconv._pixel_grid(3, 0, 2) == (0,)


def test_grid_beyond_limit_is_a_clear_error():
    raises(ValueError, r"needs 2147483648 thread-blocks .*more than a CUDA grid holds \(2147483647\)",
           mm._gather_grid, 2 ** 31 * mm.ROW_TILE, 1)
    raises(ValueError, r"more than a CUDA grid holds", cconv._pixel_grid, 2 ** 20, 2 ** 20, 2)
    assert host.flat_grid(2 ** 31 - 1) == (2 ** 31 - 1,)


@simulator
def test_public_wrapper_grid_too_large():
    """2**37 rows (a broadcast view: no memory) need 2**32 row tiles: refused before
    any launch."""
    n = 2 ** 37
    x = np.broadcast_to(np.zeros(1), (n, 2 * B))
    y = np.broadcast_to(np.zeros(1), (n, 3 * B))
    raises(ValueError, r"more than a CUDA grid holds", mm.forward, x, _mm_arrays(LAYOUT)[2],
           *_tables(LAYOUT, ("col_ptr", "col_rows", "col_slots")), B, y)


# ------------------------------------------------- layouts wider than gridDim.y
def _close(out, ref, what, tol=1e-10):
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


def _wide_case(in_blocks, out_blocks, device, seed):
    """Forward and both gradients through the public backend and block_sparse_conv2d
    (1 x 1 kernel) on ``device``, against a float64 reference summed over the live
    entries the test chose.  float64 throughout: a block row of the wide layout sums
    tens of thousands of blocks."""
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < 0.5
    mask[:, 0] = False                       # an empty block column
    mask[-1, :] = False                      # an empty block row
    mask[0, 1:] = True                       # every other column live
    layout, slots, capacity = permuted_layout(mask, extra=3, seed=seed + 1)
    rows, cols = np.nonzero(mask)
    n, dtype = 3, torch.float64
    x = randn((n, in_blocks * B), dtype, seed + 2)
    w = randn((capacity, B, B), dtype, seed + 3)
    dy = randn((n, out_blocks * B), dtype, seed + 4)
    r, c, s = (torch.as_tensor(a, dtype=torch.long) for a in (rows, cols, slots))
    xb, dyb, ws = x.view(n, in_blocks, B), dy.view(n, out_blocks, B), w[s]
    y_ref = torch.zeros(n, out_blocks, B, dtype=dtype).index_add_(
        1, c, torch.einsum("nek,ekc->nec", xb[:, r], ws)).view(n, -1)
    dx_ref = torch.zeros(n, in_blocks, B, dtype=dtype).index_add_(
        1, r, torch.einsum("nec,ekc->nek", dyb[:, c], ws)).view(n, -1)
    dw_ref = torch.einsum("nek,nec->ekc", xb[:, r], dyb[:, c])

    xd, wd, dyd = x.to(device), w.to(device), dy.to(device)
    y = backend.forward(xd, wd, layout, B)
    dx, dw = backend.backward(dyd, xd, wd, layout, B)
    _close(y.cpu(), y_ref, "y")
    _close(dx.cpu(), dx_ref, "dx")
    _close(dw.cpu()[s], dw_ref, "dw")
    assert torch.all(y[:, :B] == 0) and torch.all(dx[:, -B:] == 0)
    assert torch.all(dw.cpu()[torch.as_tensor(np.setdiff1d(np.arange(capacity), slots))] == 0)

    x4 = xd.view(n, in_blocks * B, 1, 1).clone().requires_grad_(True)
    w4 = wd.view(capacity, 1, 1, B, B).clone().requires_grad_(True)
    y4 = block_sparse_conv2d(x4, w4, layout, B)
    y4.backward(dyd.view(n, out_blocks * B, 1, 1))
    _close(y4.detach().cpu().view(n, -1), y_ref, "conv y")
    _close(x4.grad.cpu().view(n, -1), dx_ref, "conv dx")
    _close(w4.grad.cpu().view(capacity, B, B)[s], dw_ref, "conv dw")


@simulator
def test_wide_case_small_under_simulator():
    """The same checks as the GPU test below, on a layout the simulator can run."""
    with backend.simulate_cuda():
        _wide_case(2, 4, "cpu", seed=1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", [(2, WIDE), (WIDE, 2)], ids=["wide", "tall"])
def test_gpu_more_block_columns_than_grid_y(shape):
    """More than 65535 block columns (forward) or block rows (data gradient)."""
    _wide_case(*shape, "cuda", seed=3)
    torch.cuda.synchronize()


@pytest.mark.gpu
@gpu
def test_gpu_wrappers_check_device_tables():
    """Tables as torch CUDA tensors (``__cuda_array_interface__``): copied to the host
    and checked before the launch."""
    dev = torch.device("cuda")
    x, _, w, y, _, _ = _mm_arrays(LAYOUT, dtype=np.float32)
    tabs = {k: torch.from_numpy(v).to(dev) for k, v in zip(("col_ptr", "col_rows", "col_slots"),
                                                          _tables(LAYOUT, ("col_ptr", "col_rows", "col_slots")))}
    tabs["col_rows"][2] = 5
    d_x, d_w, d_y = cuda.to_device(x), cuda.to_device(w), cuda.to_device(y)
    raises(ValueError, r"col indices must lie in \[0, 2\)", mm.forward, d_x, d_w, tabs["col_ptr"], tabs["col_rows"],
           tabs["col_slots"], B, d_y)
    tabs["col_rows"][2] = 0
    mm.forward(d_x, d_w, tabs["col_ptr"], tabs["col_rows"], tabs["col_slots"], B, d_y)
    ref = reference_matmul(torch.from_numpy(x), torch.from_numpy(w), MASK, np.arange(4), B)
    assert_close(torch.from_numpy(d_y.copy_to_host()), ref, torch.float32, "y")
