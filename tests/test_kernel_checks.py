"""Checks of the public kernel functions beyond shapes and table ranges:

* weight-gradient tables must give every live entry a slot of its own (the kernels
  write ``dw[slot]`` once per entry, from parallel tasks / thread-blocks: a shared slot
  would be a race), in the CPU and numba.cuda ``backward_weight`` of matmul and conv;
  forward and data-gradient tables only read the slots and may repeat them;
* the conv functions refuse an output (``y`` / ``dy``) whose spatial size is not the
  one the input (``x`` / ``dx``), the kernel and the geometry give, instead of
  computing a differently sized convolution.  ``padding`` is ``(ph, pw)`` (both sides)
  or ``(top, left, bottom, right)``.

The refusals happen before any launch, so the numba.cuda cases cost no simulator time;
one tiny launch checks the four-value padding end to end.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, reference_matmul

from numba import cuda  # noqa: E402  (after helpers: the simulator is configured there)

from numbasparse import BlockLayout  # noqa: E402
from numbasparse.kernels.cpu import conv as cpu_conv  # noqa: E402
from numbasparse.kernels.cpu import matmul as cpu_matmul  # noqa: E402
from numbasparse.kernels.cuda import conv as cuda_conv  # noqa: E402
from numbasparse.kernels.cuda import matmul as cuda_matmul  # noqa: E402

B = 8
I32 = np.int32
TARGETS = {"cpu": (cpu_matmul, cpu_conv), "cuda": (cuda_matmul, cuda_conv)}


def _tables(layout, names, **replace):
    return [np.array(replace.get(name, getattr(layout, name)), dtype=I32) for name in names]


def _rejects(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# ================================================================ duplicate slots
MM_MASK = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)   # entries (0,0) (0,2) (1,1) (1,2): slots 0..3
MM_LAYOUT = BlockLayout(MM_MASK)
DUPLICATE_ENTRY_SLOTS = np.array([0, 1, 2, 1], I32)
ENTRY_MESSAGE = (r"entry_slots holds slot 1 twice \(entry_slots\[1\] and entry_slots\[3\]\): two live entries "
                 r"would write the weight gradient of that slot at once")


def _mm_arrays(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 2 * B))
    dy = rng.standard_normal((3, 3 * B))
    w = rng.standard_normal((4, B, B))
    return x, dy, w


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_matmul_weight_gradient_rejects_shared_slots(target):
    matmul = TARGETS[target][0]
    x, dy, _ = _mm_arrays()
    dw = np.full((4, B, B), 7.0)
    rows, cols, _ = _tables(MM_LAYOUT, ("entry_rows", "entry_cols", "entry_slots"))
    _rejects(ENTRY_MESSAGE, matmul.backward_weight, x, dy, rows, cols, DUPLICATE_ENTRY_SLOTS, B, dw)
    # the first shared slot found is named, wherever the pair sits
    _rejects(r"entry_slots holds slot 3 twice \(entry_slots\[0\] and entry_slots\[2\]\)", matmul.backward_weight,
             x, dy, rows, cols, np.array([3, 0, 3, 2], I32), B, dw)
    assert np.all(dw == 7.0), "a refused call must not write dw"


def test_cuda_matmul_weight_gradient_rejects_shared_slots_in_device_tables():
    x, dy, _ = _mm_arrays()
    dw = np.full((4, B, B), 7.0)
    rows, cols, _ = _tables(MM_LAYOUT, ("entry_rows", "entry_cols", "entry_slots"))
    _rejects(ENTRY_MESSAGE, cuda_matmul.backward_weight, x, dy, cuda.to_device(rows), cuda.to_device(cols),
             cuda.to_device(DUPLICATE_ENTRY_SLOTS), B, dw)
    assert np.all(dw == 7.0)


def test_cpu_matmul_distinct_slots_still_pass_and_reads_may_share_slots():
    """A permutation of slots with a free one is fine for the weight gradient; the
    forward (which only reads ``w[slot]``) accepts two entries sharing a slot."""
    x, dy, w = _mm_arrays(seed=1)
    slots = np.array([4, 0, 2, 1], I32)                  # slot 3 free
    layout = BlockLayout(MM_MASK, slots=slots, capacity=5)
    dw = np.full((5, B, B), 7.0)
    cpu_matmul.backward_weight(x, dy, *_tables(layout, ("entry_rows", "entry_cols", "entry_slots")), B, dw)
    _, _, dw_ref = reference_matmul(torch.from_numpy(x), torch.from_numpy(np.concatenate([w, w[:1]])), MM_MASK,
                                    slots, B, torch.from_numpy(dy))
    assert_close(torch.from_numpy(dw[slots]), dw_ref[slots], torch.float64, "dw")
    assert np.all(dw[3] == 7.0)

    shared = np.array([0, 1, 2, 1], I32)                 # entries (0,2) and (1,2) both read w[1]
    col = _tables(MM_LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    col_slots = shared[[0, 2, 1, 3]]                     # by-column order: (0,0) (1,1) (0,2) (1,2)
    y = np.full((3, 3 * B), np.nan)
    cpu_matmul.forward(x, w, col[0], col[1], col_slots.astype(I32), B, y)
    expected = np.concatenate([x[:, :B] @ w[0], x[:, B:] @ w[2], x[:, :B] @ w[1] + x[:, B:] @ w[1]], axis=1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


CONV_MASK = np.array([[1, 0, 1], [1, 0, 0]], dtype=bool)   # row 0: blocks 0 and 2, row 1: block 0
CONV_LAYOUT = BlockLayout(CONV_MASK, slots=[3, 0, 1], capacity=4)
GEOMETRY = ((1, 1), (1, 0), (1, 1))                        # stride, padding (1 row each side), dilation


def _conv_arrays(size=(6, 7), kernel=(3, 2), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2 * B, *size))
    w = rng.standard_normal((4, *kernel, B, B))
    out = (size[0] + 2 - kernel[0] + 1, size[1] - kernel[1] + 1)
    dy = rng.standard_normal((1, 3 * B, *out))
    return x, w, dy


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_conv_weight_gradient_rejects_shared_slots(target):
    conv = TARGETS[target][1]
    x, w, dy = _conv_arrays()
    dw = np.full(w.shape, 7.0)
    ptr, cols, _ = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    _rejects(r"row_slots holds slot 3 twice \(row_slots\[0\] and row_slots\[2\]\): two live entries would write "
             r"the weight gradient of that slot at once", conv.backward_weight, x, dy, ptr, cols,
             np.array([3, 0, 3], I32), B, *GEOMETRY, dw)
    assert np.all(dw == 7.0), "a refused call must not write dw"
    # the data gradient only reads the slots: the same tables pass its checks (a wrong
    # dx size then shows that the call got past the tables)
    _rejects(r"dy has spatial size", conv.backward_data, dy, w, ptr, cols, np.array([3, 0, 3], I32), B,
             *GEOMETRY, np.zeros((1, 2 * B, 5, 7)))


def test_cuda_conv_weight_gradient_rejects_shared_slots_in_device_tables():
    x, w, dy = _conv_arrays()
    dw = np.full(w.shape, 7.0)
    ptr, cols, _ = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    _rejects(r"row_slots holds slot 0 twice \(row_slots\[1\] and row_slots\[2\]\)", cuda_conv.backward_weight,
             x, dy, cuda.to_device(ptr), cuda.to_device(cols), cuda.to_device(np.array([3, 0, 0], I32)), B,
             *GEOMETRY, dw)
    assert np.all(dw == 7.0)


# ============================================================ conv spatial sizes
def _size_message(out_name, actual, expected, in_name, in_size, padding=(1, 0, 1, 0), kernel=(3, 2),
                  stride=(1, 1), dilation=(1, 1)):
    return re.escape(f"{out_name} has spatial size {actual}, expected {expected}: the output size for {in_name} "
                     f"of spatial size {in_size}, kernel {kernel}, stride {stride}, padding (top, left, bottom, "
                     f"right) {padding} and dilation {dilation}")


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_conv_rejects_outputs_of_the_wrong_size(target):
    """x (6, 7), kernel (3, 2), padding 1 row on each side: outputs (6, 6)."""
    conv = TARGETS[target][1]
    x, w, dy = _conv_arrays()
    col = _tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    row = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    for shape in ((7, 6), (6, 5), (5, 6)):
        y = np.full((1, 3 * B, *shape), np.nan)
        _rejects(_size_message("y", shape, (6, 6), "x", (6, 7)), conv.forward, x, w, *col, B, *GEOMETRY, y)
        assert np.all(np.isnan(y)), "a refused call must not write y"
    dx = np.full(x.shape, np.nan)
    dw = np.full(w.shape, 7.0)
    small_dy = np.zeros((1, 3 * B, 6, 5))
    _rejects(_size_message("dy", (6, 5), (6, 6), "dx", (6, 7)), conv.backward_data, small_dy, w, *row, B,
             *GEOMETRY, dx)
    _rejects(_size_message("dy", (6, 5), (6, 6), "x", (6, 7)), conv.backward_weight, x, small_dy, *row, B,
             *GEOMETRY, dw)
    # dx of another size than the input the dy came from
    _rejects(_size_message("dy", (6, 6), (7, 6), "dx", (7, 7)), conv.backward_data, dy, w, *row, B, *GEOMETRY,
             np.full((1, 2 * B, 7, 7), np.nan))
    _rejects(_size_message("dy", (6, 6), (6, 7), "dx", (6, 8)), conv.backward_data, dy, w, *row, B, *GEOMETRY,
             np.full((1, 2 * B, 6, 8), np.nan))
    # x of another size than dy's input, for the weight gradient
    _rejects(_size_message("dy", (6, 6), (5, 6), "x", (5, 7)), conv.backward_weight, x[:, :, :5].copy(), dy,
             *row, B, *GEOMETRY, dw)
    # the old reading of a pair as (top, left) with a free bottom: an extra row is refused
    _rejects(_size_message("y", (5, 6), (6, 6), "x", (6, 7)), conv.forward, x, w, *col, B, (1, 1), (1, 0),
             (1, 1), np.zeros((1, 3 * B, 5, 6)))
    # stride and dilation enter the expected size (the one F.conv2d gives)
    assert F.conv2d(torch.zeros(1, 1, 6, 7), torch.zeros(1, 1, 3, 2), stride=(2, 3), padding=(0, 2),
                    dilation=(2, 1)).shape[2:] == (1, 4)
    _rejects(_size_message("y", (3, 3), (1, 4), "x", (6, 7), padding=(0, 2, 0, 2), stride=(2, 3),
                           dilation=(2, 1)),
             conv.forward, x, w, *col, B, (2, 3), (0, 2), (2, 1), np.zeros((1, 3 * B, 3, 3)))
    assert np.all(np.isnan(dx)) and np.all(dw == 7.0)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_conv_rejects_malformed_padding(target):
    conv = TARGETS[target][1]
    x, w, dy = _conv_arrays()
    col = _tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    y = np.zeros((1, 3 * B, 6, 6))
    for padding in ((1, 0, 1), (1, 0, 1, -1), 1, (1.0, 0)):
        _rejects(r"padding must be a pair of integers >= 0 \(rows at the top and bottom, columns on the left and "
                 r"right\) or four \(top, left, bottom, right\), got " + re.escape(repr(padding)), conv.forward,
                 x, w, *col, B, (1, 1), padding, (1, 1), y)


def _dense(w, mask, slots):
    """float64 ``(out, in, kh, kw)`` weight from blocks ``w`` (a tensor), block by block."""
    kh, kw = w.shape[1:3]
    dense = torch.zeros(mask.shape[1] * B, mask.shape[0] * B, kh, kw, dtype=torch.float64)
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        dense[j * B:(j + 1) * B, i * B:(i + 1) * B] = w[s].permute(3, 2, 0, 1)
    return dense


def _padded_conv(x, dense, padding, stride):
    """conv2d of ``x`` padded ``(top, left, bottom, right)``."""
    top, left, bottom, right = padding
    return F.conv2d(F.pad(x, (left, right, top, bottom)), dense, stride=stride)


def test_cpu_conv_four_value_padding():
    """padding (top 2, left 0, bottom 0, right 1), stride (2, 1) on a 6 x 7 input with a
    3 x 2 kernel: outputs (3, 7); all three functions against F.conv2d on a padded input."""
    x, w, _ = _conv_arrays(seed=5)
    padding, stride, slots = (2, 0, 0, 1), (2, 1), [3, 0, 1]
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    y_ref = _padded_conv(xt, _dense(wt, CONV_MASK, slots), padding, stride)
    assert tuple(y_ref.shape[2:]) == (3, 7)
    dy = np.random.default_rng(6).standard_normal(tuple(y_ref.shape))
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (xt, wt), torch.from_numpy(dy))
    col = _tables(CONV_LAYOUT, ("col_ptr", "col_rows", "col_slots"))
    row = _tables(CONV_LAYOUT, ("row_ptr", "row_cols", "row_slots"))
    y = np.full(dy.shape, np.nan)
    dx = np.full(x.shape, np.nan)
    dw = np.full(w.shape, 7.0)
    cpu_conv.forward(x, w, *col, B, stride, padding, (1, 1), y)
    cpu_conv.backward_data(dy, w, *row, B, stride, padding, (1, 1), dx)
    cpu_conv.backward_weight(x, dy, *row, B, stride, padding, (1, 1), dw)
    assert_close(torch.from_numpy(y), y_ref, torch.float64, "y")
    assert_close(torch.from_numpy(dx), dx_ref, torch.float64, "dx")
    assert_close(torch.from_numpy(dw[slots]), dw_ref[slots], torch.float64, "dw")
    assert np.all(dw[2] == 7.0), "the free slot must stay untouched"


def test_cuda_conv_four_value_padding():
    """One thread-block: a 1 x 1 block layout, a 3 x 3 image, a 2 x 2 kernel, padding
    (top 1, left 0, bottom 0, right 1): outputs (3, 3)."""
    rng = np.random.default_rng(7)
    layout = BlockLayout(np.ones((1, 1), bool))
    x = rng.standard_normal((1, B, 3, 3))
    w = rng.standard_normal((1, 2, 2, B, B))
    y = np.full((1, B, 3, 3), np.nan)
    cuda_conv.forward(x, w, *_tables(layout, ("col_ptr", "col_rows", "col_slots")), B, (1, 1), (1, 0, 0, 1),
                      (1, 1), y)
    ref = _padded_conv(torch.from_numpy(x), _dense(torch.from_numpy(w), np.ones((1, 1), bool), [0]), (1, 0, 0, 1),
                       (1, 1))
    assert_close(torch.from_numpy(y), ref, torch.float64, "y")


def test_cpu_kernels_refuse_outputs_overlapping_inputs():
    from numbasparse.kernels.cpu import conv as cpu_conv
    from numbasparse.kernels.cpu import matmul as cpu_matmul

    layout = BlockLayout(np.ones((2, 2), dtype=bool))
    B = 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2 * B)).astype(np.float32)
    w = rng.standard_normal((4, B, B)).astype(np.float32)
    with pytest.raises(ValueError, match="y shares memory with x"):
        cpu_matmul.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, x)
    with pytest.raises(ValueError, match="dx shares memory with dy"):
        cpu_matmul.backward_data(x, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, x)
    buffer = rng.standard_normal(4 * B * B).astype(np.float32)
    x_view, dw = buffer[:3 * 2 * B].reshape(3, 2 * B), buffer.reshape(4, B, B)
    with pytest.raises(ValueError, match="dw shares memory with x"):
        cpu_matmul.backward_weight(x_view, x, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw)
    images = rng.standard_normal((1, 2 * B, 4, 4)).astype(np.float32)
    taps = rng.standard_normal((4, 1, 1, B, B)).astype(np.float32)
    with pytest.raises(ValueError, match="y shares memory with x"):
        cpu_conv.forward(images, taps, layout.col_ptr, layout.col_rows, layout.col_slots, B, (1, 1),
                         (0, 0, 0, 0), (1, 1), images)
