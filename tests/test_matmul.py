"""block_sparse_matmul / BlocksparseMatMul against a float64 dense masked reference:
forward, data and weight gradients, on the CPU kernels, under the CUDA simulator (tiny
sizes) and on a real GPU (marked ``gpu``)."""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numbasparse
from numbasparse import BlockLayout, BlocksparseMatMul, block_sparse_matmul
from numbasparse.backend import simulate_cuda

from helpers import (TOL, assert_close, dead_slots, default_slots, dense_reference,
                     dense_reference_numpy, mask_with_empty, permuted_layout, randn,
                     reference_matmul, rel_err)

BLOCK_SIZES = (8, 16, 32)
DTYPES = (torch.float32, torch.float64)

# Layout used by the main matrix: 4 x 5 blocks, block row 1 and block column 3 empty,
# live blocks in permuted slots of a storage with 3 dead slots.
IN_BLOCKS, OUT_BLOCKS, EMPTY_ROW, EMPTY_COL = 4, 5, 1, 3


def _layout(seed=0, extra=3):
    mask = mask_with_empty(IN_BLOCKS, OUT_BLOCKS, EMPTY_ROW, EMPTY_COL, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=extra, seed=seed + 100)
    return mask, layout, slots, capacity


def _x_view(kind, n, c, feature_axis, dtype, seed):
    """A leaf tensor and a (possibly non-contiguous) view of it shaped as the input
    ``(N, C)`` (feature_axis 1) or ``(C, N)`` (feature_axis 0)."""
    shape = (n, c) if feature_axis == 1 else (c, n)
    if kind == "contiguous":
        leaf = randn(shape, dtype, seed, requires_grad=True)
        view = lambda t: t  # noqa: E731
    elif kind == "transposed":
        leaf = randn(shape[::-1], dtype, seed, requires_grad=True)
        view = lambda t: t.t()  # noqa: E731
    elif kind == "strided":
        leaf = randn((shape[0], 2 * shape[1] + 1), dtype, seed, requires_grad=True)
        view = lambda t: t[:, 1::2]  # noqa: E731
    elif kind == "broadcast":  # stride-0 rows (or columns)
        if feature_axis == 1:
            leaf = randn((1, c), dtype, seed, requires_grad=True)
            view = lambda t: t.expand(n, c)  # noqa: E731
        else:
            leaf = randn((c, 1), dtype, seed, requires_grad=True)
            view = lambda t: t.expand(c, n)  # noqa: E731
    else:
        raise AssertionError(kind)
    x = view(leaf)
    assert tuple(x.shape) == shape
    if kind != "contiguous" and n > 1:
        assert not x.is_contiguous()
    return leaf, view


def _check_matmul_case(B, n, feature_axis, x_kind, dtype, seed, extra=3):
    mask, layout, slots, capacity = _layout(seed=seed, extra=extra)
    C, K = IN_BLOCKS * B, OUT_BLOCKS * B
    leaf, view = _x_view(x_kind, n, C, feature_axis, dtype, seed + 1)
    w = randn((capacity, B, B), dtype, seed + 2, requires_grad=True)
    bsmm = BlocksparseMatMul(layout, block_size=B, feature_axis=feature_axis)
    assert bsmm.w_shape == (capacity, B, B)

    y = bsmm(view(leaf), w)
    assert y.dtype == dtype
    assert tuple(y.shape) == bsmm.o_shape(n)
    dy = randn(tuple(y.shape), dtype, seed + 3)
    y.backward(dy)

    # float64 reference through the same view; feature_axis 0 is y^T = x^T @ W
    leaf64 = leaf.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    x64 = view(leaf64)
    dense = dense_reference(w64, mask, slots, B)
    y_ref = x64 @ dense if feature_axis == 1 else (x64.t() @ dense).t()
    dleaf_ref, dw_ref = torch.autograd.grad(y_ref, (leaf64, w64), dy.double())

    assert_close(y, y_ref, dtype, "y")
    assert_close(leaf.grad, dleaf_ref, dtype, "dx")
    assert_close(w.grad, dw_ref, dtype, "dw")

    # structural zeros: empty output block column, empty input block row, dead slots
    y_feat = y if feature_axis == 1 else y.t()
    assert torch.all(y_feat[:, EMPTY_COL * B:(EMPTY_COL + 1) * B] == 0)
    assert torch.all(y_feat[:, :EMPTY_COL * B] != 0)  # the live part really was computed
    if x_kind != "broadcast":  # dx in x's own shape (a view of the leaf's gradient)
        dx = view(leaf.grad)
        dx_feat = dx if feature_axis == 1 else dx.t()
        assert torch.all(dx_feat[:, EMPTY_ROW * B:(EMPTY_ROW + 1) * B] == 0)
        assert torch.all(dx_feat[:, :EMPTY_ROW * B] != 0)
    dead = dead_slots(slots, capacity)
    assert dead.size == extra
    assert torch.all(w.grad[torch.as_tensor(dead)] == 0)
    assert torch.all(w.grad[torch.as_tensor(slots)].abs().sum(dim=(1, 2)) > 0)


# ------------------------------------------------------------------- CPU kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_kind", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("feature_axis", [0, 1])
@pytest.mark.parametrize("n", [1, 7, 130])
@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_forward_backward_vs_dense_reference(B, n, feature_axis, x_kind, dtype):
    seed = 1000 * B + 10 * n + feature_axis + (0 if dtype == torch.float32 else 5)
    _check_matmul_case(B, n, feature_axis, x_kind, dtype, seed)


@pytest.mark.parametrize("feature_axis", [0, 1])
@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_broadcast_stride0_input(B, feature_axis):
    _check_matmul_case(B, 7, feature_axis, "broadcast", torch.float32, seed=7 * B + feature_axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_dx_of_empty_block_row_is_exactly_zero(B, dtype):
    mask, layout, slots, capacity = _layout(seed=B)
    x = randn((130, IN_BLOCKS * B), dtype, 1, requires_grad=True)
    w = randn((capacity, B, B), dtype, 2, requires_grad=True)
    y = block_sparse_matmul(x, w, layout)
    y.backward(randn(tuple(y.shape), dtype, 3))
    blocks = x.grad.split(B, dim=1)
    assert torch.all(blocks[EMPTY_ROW] == 0)
    for i, blk in enumerate(blocks):
        if i != EMPTY_ROW:
            assert blk.abs().sum() > 0
    assert torch.all(y.split(B, dim=1)[EMPTY_COL] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_leading_dims(B, dtype):
    mask, layout, slots, capacity = _layout(seed=3 * B)
    C = IN_BLOCKS * B
    # (B1, B2, C) with non-contiguous leading dims
    leaf = randn((3, 2, C), dtype, 11, requires_grad=True)
    x = leaf.transpose(0, 1)
    w = randn((capacity, B, B), dtype, 12, requires_grad=True)
    y = block_sparse_matmul(x, w, layout, block_size=B)
    assert tuple(y.shape) == (2, 3, OUT_BLOCKS * B)
    dy = randn(tuple(y.shape), dtype, 13)
    y.backward(dy)
    leaf64 = leaf.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y_ref = leaf64.transpose(0, 1) @ dense_reference(w64, mask, slots, B)
    dl_ref, dw_ref = torch.autograd.grad(y_ref, (leaf64, w64), dy.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(leaf.grad, dl_ref, dtype, "dx")
    assert_close(w.grad, dw_ref, dtype, "dw")
    assert torch.all(w.grad[torch.as_tensor(dead_slots(slots, capacity))] == 0)


def test_one_dimensional_x():
    B = 8
    mask, layout, slots, capacity = _layout(seed=4)
    x = randn((IN_BLOCKS * B,), torch.float64, 1)
    w = randn((capacity, B, B), torch.float64, 2)
    y = block_sparse_matmul(x, w, layout)
    assert tuple(y.shape) == (OUT_BLOCKS * B,)
    assert_close(y, reference_matmul(x[None], w, mask, slots, B)[0], torch.float64, "y")


@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_layout_given_as_plain_mask(B):
    """A 0/1 numpy / torch / list mask is accepted; slots are then row-major 0..nnz-1."""
    mask = mask_with_empty(3, 4, 0, 2, seed=B)
    slots = default_slots(mask)
    x = randn((9, 3 * B), torch.float64, 5)
    w = randn((len(slots), B, B), torch.float64, 6)
    ref = reference_matmul(x, w, mask, slots, B)
    for layout in (mask.astype(np.int64), torch.from_numpy(mask), mask.astype(int).tolist()):
        assert_close(block_sparse_matmul(x, w, layout), ref, torch.float64, "y")


@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_non_contiguous_weight(B):
    mask, layout, slots, capacity = _layout(seed=5 * B)
    x = randn((7, IN_BLOCKS * B), torch.float64, 1)
    base = randn((capacity, B, B), torch.float64, 2, requires_grad=True)
    w = base.transpose(1, 2)
    assert not w.is_contiguous()
    y = block_sparse_matmul(x, w, layout)
    dy = randn(tuple(y.shape), torch.float64, 3)
    y.backward(dy)
    _, _, dw_ref = reference_matmul(x, w, mask, slots, B, dy)
    assert_close(y, reference_matmul(x, w, mask, slots, B), torch.float64, "y")
    assert_close(base.grad, dw_ref.transpose(1, 2), torch.float64, "dw")


@pytest.mark.parametrize("needs", ["x", "w"])
def test_single_input_gradient(needs):
    """Only the requested gradient is computed and it is still correct."""
    B = 16
    mask, layout, slots, capacity = _layout(seed=6)
    x = randn((7, IN_BLOCKS * B), torch.float32, 1, requires_grad=needs == "x")
    w = randn((capacity, B, B), torch.float32, 2, requires_grad=needs == "w")
    y = block_sparse_matmul(x, w, layout)
    dy = randn(tuple(y.shape), torch.float32, 3)
    y.backward(dy)
    _, dx_ref, dw_ref = reference_matmul(x, w, mask, slots, B, dy)
    if needs == "x":
        assert w.grad is None
        assert_close(x.grad, dx_ref, torch.float32, "dx")
    else:
        assert x.grad is None
        assert_close(w.grad, dw_ref, torch.float32, "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_batch_spans_many_row_tiles(dtype):
    """N = 1000 rows (many 64-row CPU tiles, a ragged last tile) and a longer weight
    reduction."""
    B = 32
    mask, layout, slots, capacity = _layout(seed=8)
    x = randn((1000, IN_BLOCKS * B), dtype, 1, requires_grad=True)
    w = randn((capacity, B, B), dtype, 2, requires_grad=True)
    y = block_sparse_matmul(x, w, layout)
    dy = randn(tuple(y.shape), dtype, 3)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference_matmul(x, w, mask, slots, B, dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dx")
    assert_close(w.grad, dw_ref, dtype, "dw")


def test_empty_batch():
    B = 8
    mask, layout, slots, capacity = _layout(seed=9)
    x = torch.empty((0, IN_BLOCKS * B), requires_grad=True)
    w = randn((capacity, B, B), torch.float32, 2, requires_grad=True)
    y = block_sparse_matmul(x, w, layout)
    assert tuple(y.shape) == (0, OUT_BLOCKS * B)
    y.sum().backward()
    assert tuple(x.grad.shape) == (0, IN_BLOCKS * B)
    assert torch.all(w.grad == 0)


@pytest.mark.parametrize("capacity", [0, 3])
def test_layout_without_live_blocks(capacity):
    B = 8
    layout = BlockLayout(np.zeros((2, 3), dtype=bool), capacity=capacity)
    x = randn((5, 2 * B), torch.float32, 1, requires_grad=True)
    w = randn((capacity, B, B), torch.float32, 2, requires_grad=True)
    y = block_sparse_matmul(x, w, layout, block_size=B)
    assert tuple(y.shape) == (5, 3 * B)
    assert torch.all(y == 0)
    y.backward(randn((5, 3 * B), torch.float32, 3))
    assert torch.all(x.grad == 0)
    assert torch.all(w.grad == 0)


def test_nan_and_inf_propagate_only_where_they_flow():
    """fastmath without nnan/ninf: a NaN in x reaches exactly the outputs it feeds."""
    B = 8
    mask = np.array([[1, 0, 0], [0, 1, 0]], dtype=bool)  # block 0 -> out 0, block 1 -> out 1
    x = randn((4, 2 * B), torch.float32, 1)
    x[2, 3] = float("nan")     # input block 0, row 2
    x[1, B + 1] = float("inf")  # input block 1, row 1
    w = randn((2, B, B), torch.float32, 2).abs() + 0.1  # positive: inf stays inf
    y = block_sparse_matmul(x, w, mask)
    nan_expected = torch.zeros_like(y, dtype=torch.bool)
    nan_expected[2, :B] = True
    inf_expected = torch.zeros_like(y, dtype=torch.bool)
    inf_expected[1, B:2 * B] = True
    assert torch.equal(torch.isnan(y), nan_expected)
    assert torch.equal(torch.isinf(y), inf_expected)
    assert torch.all(y[:, 2 * B:] == 0)


def test_result_independent_of_thread_count(monkeypatch):
    from numbasparse.kernels.cpu import runtime

    monkeypatch.setattr(runtime, "SERIAL_WORK", 0)  # even this small call on every thread
    B = 16
    mask, layout, slots, capacity = _layout(seed=10)
    x = randn((300, IN_BLOCKS * B), torch.float32, 1, requires_grad=True)
    w = randn((capacity, B, B), torch.float32, 2, requires_grad=True)
    dy = randn((300, OUT_BLOCKS * B), torch.float32, 3)
    results = []
    try:
        for threads in (1, max(2, torch.get_num_threads())):
            numbasparse.set_num_threads(threads)
            x.grad = w.grad = None
            y = block_sparse_matmul(x, w, layout)
            y.backward(dy)
            results.append((y.detach().clone(), x.grad.clone(), w.grad.clone()))
    finally:
        numbasparse.set_num_threads(None)
    for a, b in zip(results[0], results[-1]):
        assert torch.equal(a, b)


@settings(max_examples=25, deadline=None)
@given(in_blocks=st.integers(1, 4), out_blocks=st.integers(1, 4), n=st.integers(1, 70),
       B=st.sampled_from(BLOCK_SIZES), extra=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_random_layouts_property(in_blocks, out_blocks, n, B, extra, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < 0.5
    nnz = int(mask.sum())
    capacity = nnz + extra
    slots = rng.permutation(capacity)[:nnz]
    layout = BlockLayout(mask, slots=slots.copy(), capacity=capacity)
    x = randn((n, in_blocks * B), torch.float64, seed % 1000, requires_grad=True)
    w = randn((capacity, B, B), torch.float64, seed % 1000 + 1, requires_grad=True)
    y = block_sparse_matmul(x, w, layout)
    dy = randn(tuple(y.shape), torch.float64, seed % 1000 + 2)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = reference_matmul(x, w, mask, slots, B, dy)
    for got, ref in ((y.detach(), y_ref), (x.grad, dx_ref), (w.grad, dw_ref)):
        assert got.shape == ref.shape
        if ref.numel():
            scale = max(ref.abs().max().item(), 1.0)
            assert (got - ref).abs().max().item() <= TOL[torch.float64] * scale
    # exact structural zeros
    for j in range(out_blocks):
        if not mask[:, j].any():
            assert torch.all(y[:, j * B:(j + 1) * B] == 0)
    for i in range(in_blocks):
        if not mask[i].any():
            assert torch.all(x.grad[:, i * B:(i + 1) * B] == 0)
    dead = dead_slots(slots, capacity)
    if dead.size:
        assert torch.all(w.grad[torch.as_tensor(dead)] == 0)


# ----------------------------------------------------------------- gradcheck (float64)
def test_gradcheck_functional():
    B = 8
    mask = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]], dtype=bool)  # empty row 1, empty col 2
    layout = BlockLayout(mask, slots=[3, 0, 2], capacity=4)          # slot 1 dead
    x = randn((2, 3 * B), torch.float64, 1, requires_grad=True)
    w = randn((4, B, B), torch.float64, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: block_sparse_matmul(a, b, layout), (x, w))


def test_gradcheck_feature_axis0():
    B = 8
    mask = np.array([[1, 0], [1, 1]], dtype=bool)
    layout = BlockLayout(mask, slots=[1, 3, 0], capacity=4)
    capacity = 4
    bsmm = BlocksparseMatMul(layout, block_size=B, feature_axis=0)
    x = randn((2 * B, 3), torch.float64, 5, requires_grad=True)
    w = randn((capacity, B, B), torch.float64, 6, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bsmm(a, b), (x, w))


# ---------------------------------------------------------------- OpenAI blog example
def _blog_example(hidden_size, block_size, minibatch_size, seed):
    np.random.seed(seed)
    torch.manual_seed(seed)
    # --- the snippet, with torch tensors in place of TF placeholders / variables ---
    sparsity = np.random.randint(2, size=(hidden_size // block_size, hidden_size // block_size))
    bsmm = BlocksparseMatMul(sparsity, block_size=block_size)
    x = torch.randn(minibatch_size, hidden_size)
    w = torch.randn(bsmm.w_shape)
    y = bsmm(x, w)
    # -------------------------------------------------------------------------------
    assert bsmm.w_shape == (int(sparsity.sum()), block_size, block_size)
    assert tuple(y.shape) == (minibatch_size, hidden_size)
    slots = np.arange(int(sparsity.sum()))
    dense = dense_reference_numpy(w, sparsity, slots, block_size)
    ref = torch.from_numpy(x.double().numpy() @ dense)
    assert_close(y, ref, torch.float32, "blog example y")
    # the package's own fprop_test agrees too
    assert rel_err(bsmm.fprop_test(x, w), ref) < 1e-5


def test_openai_blog_example_exact_4096():
    _blog_example(hidden_size=4096, block_size=32, minibatch_size=64, seed=0)


@pytest.mark.parametrize("block_size", [8, 16])
def test_openai_blog_example_smaller(block_size):
    _blog_example(hidden_size=512, block_size=block_size, minibatch_size=64, seed=block_size)


# ---------------------------------------------------- CUDA kernels under the simulator
# Never skipped on a CPU-only machine (tests/helpers.py enables the simulator there); on
# a machine with a real GPU the simulator is off and the gpu tests below run instead.
simulator = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="real GPU present: the simulator is off (see the gpu tests)")

SIM_IN, SIM_OUT, SIM_EMPTY_ROW, SIM_EMPTY_COL = 3, 4, 1, 2


def _sim_case(B, n, feature_axis, dtype, seed, lead=None):
    mask = mask_with_empty(SIM_IN, SIM_OUT, SIM_EMPTY_ROW, SIM_EMPTY_COL, density=0.4, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=seed + 1)
    C, K = SIM_IN * B, SIM_OUT * B
    if lead is not None:  # (B1, B2, C) with non-contiguous leading dims
        leaf = randn((lead[1], lead[0], C), dtype, seed + 2, requires_grad=True)
        view = lambda t: t.transpose(0, 1)  # noqa: E731
        call = lambda a, b: block_sparse_matmul(a, b, layout, block_size=B)  # noqa: E731
        ref_fn = lambda a, d: a @ d  # noqa: E731
    elif feature_axis == 1:  # strided (non-contiguous) x
        leaf = randn((n, 2 * C), dtype, seed + 2, requires_grad=True)
        view = lambda t: t[:, ::2]  # noqa: E731
        bsmm = BlocksparseMatMul(layout, block_size=B, feature_axis=1)
        call = bsmm
        ref_fn = lambda a, d: a @ d  # noqa: E731
    else:  # feature_axis 0: x (C, N) given as a transposed view
        leaf = randn((n, C), dtype, seed + 2, requires_grad=True)
        view = lambda t: t.t()  # noqa: E731
        bsmm = BlocksparseMatMul(layout, block_size=B, feature_axis=0)
        call = bsmm
        ref_fn = lambda a, d: (a.t() @ d).t()  # noqa: E731
    w = randn((capacity, B, B), dtype, seed + 3, requires_grad=True)
    with simulate_cuda():
        y = call(view(leaf), w)
        dy = randn(tuple(y.shape), dtype, seed + 4)
        y.backward(dy)
    leaf64 = leaf.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y_ref = ref_fn(view(leaf64), dense_reference(w64, mask, slots, B))
    dl_ref, dw_ref = torch.autograd.grad(y_ref, (leaf64, w64), dy.double())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y (simulated cuda)")
    assert_close(leaf.grad, dl_ref, dtype, "dx (simulated cuda)")
    assert_close(w.grad, dw_ref, dtype, "dw (simulated cuda)")
    y_feat = y if feature_axis == 1 or lead is not None else y.t()
    assert torch.all(y_feat[..., SIM_EMPTY_COL * B:(SIM_EMPTY_COL + 1) * B] == 0)
    dead = dead_slots(slots, capacity)
    assert torch.all(w.grad[torch.as_tensor(dead)] == 0)
    dl = leaf.grad if lead is None and feature_axis == 1 else None
    if dl is not None:  # strided view: the grad of the used columns of the empty block row
        used = dl[:, ::2]
        assert torch.all(used[:, SIM_EMPTY_ROW * B:(SIM_EMPTY_ROW + 1) * B] == 0)
    elif lead is None:   # transposed leaf (N, C)
        assert torch.all(leaf.grad[:, SIM_EMPTY_ROW * B:(SIM_EMPTY_ROW + 1) * B] == 0)


@simulator
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature_axis", [0, 1])
@pytest.mark.parametrize("B", [8, 16])
def test_simulated_cuda_forward_backward(B, feature_axis, dtype):
    _sim_case(B, 5, feature_axis, dtype, seed=B + 10 * feature_axis + (0 if dtype == torch.float32 else 50))


@simulator
def test_simulated_cuda_block32():
    _sim_case(32, 3, 1, torch.float32, seed=77)


@simulator
@pytest.mark.parametrize("n", [1, 33])
def test_simulated_cuda_row_counts(n):
    """N = 1 and N = 33 (one row past a 32-row CUDA tile)."""
    _sim_case(8, n, 1, torch.float64, seed=200 + n)


@simulator
def test_simulated_cuda_leading_dims():
    _sim_case(8, None, 1, torch.float32, seed=300, lead=(2, 2))


@simulator
def test_simulated_cuda_empty_layout_and_batch():
    B = 8
    layout = BlockLayout(np.zeros((2, 3), dtype=bool), capacity=2)
    x = randn((3, 2 * B), torch.float32, 1, requires_grad=True)
    w = randn((2, B, B), torch.float32, 2, requires_grad=True)
    with simulate_cuda():
        y = block_sparse_matmul(x, w, layout)
        y.backward(randn(tuple(y.shape), torch.float32, 3))
        assert torch.all(y == 0) and torch.all(x.grad == 0) and torch.all(w.grad == 0)
        mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
        x0 = torch.empty((0, 2 * B), requires_grad=True)
        w0 = randn((3, B, B), torch.float32, 4, requires_grad=True)
        y0 = block_sparse_matmul(x0, w0, mask)
        assert tuple(y0.shape) == (0, 3 * B)
        y0.sum().backward()
        assert torch.all(w0.grad == 0)


@simulator
def test_simulated_cuda_gradcheck_x():
    B = 8
    mask = np.array([[1, 0], [1, 1]], dtype=bool)
    layout = BlockLayout(mask, slots=[2, 0, 1], capacity=4)
    x = randn((2, 2 * B), torch.float64, 1, requires_grad=True)
    w = randn((4, B, B), torch.float64, 2, requires_grad=True)
    with simulate_cuda():  # fast mode: a few simulated launches instead of one per element
        assert torch.autograd.gradcheck(lambda a, b: block_sparse_matmul(a, b, layout), (x, w),
                                        fast_mode=True)


@simulator
def test_simulate_cuda_really_switches_backend(monkeypatch):
    """Under simulate_cuda() the CUDA kernel module is the one called."""
    import numbasparse.kernels.cuda.matmul as cuda_matmul

    calls = []
    original = cuda_matmul._forward   # the unchecked launcher the backend calls

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cuda_matmul, "_forward", spy)
    mask = np.array([[1, 1]], dtype=bool)
    x = randn((2, 8), torch.float32, 1)
    w = randn((2, 8, 8), torch.float32, 2)
    block_sparse_matmul(x, w, mask)
    assert calls == []
    with simulate_cuda():
        y = block_sparse_matmul(x, w, mask)
    assert calls == [1]
    assert_close(y, reference_matmul(x, w, mask, [0, 1], 8), torch.float32, "y")


# ------------------------------------------------------------------ real GPU
def _gpu_case(feature_axis, dtype):
    hidden, n, B = 1024, 256, 32
    blocks = hidden // B
    mask = mask_with_empty(blocks, blocks, 5, 7, density=0.2, seed=1)
    layout, slots, capacity = permuted_layout(mask, extra=16, seed=2)
    dev = torch.device("cuda")
    shape = (n, hidden) if feature_axis == 1 else (hidden, n)
    x = randn(shape, dtype, 3).to(dev).requires_grad_(True)
    w = randn((capacity, B, B), dtype, 4).to(dev).requires_grad_(True)
    bsmm = BlocksparseMatMul(layout, block_size=B, feature_axis=feature_axis)
    y = bsmm(x, w)
    assert y.device.type == "cuda"
    dy = randn(tuple(y.shape), dtype, 5).to(dev)
    y.backward(dy)
    torch.cuda.synchronize()
    xc = x.detach().cpu()
    x_feat = xc if feature_axis == 1 else xc.t()
    dy_feat = dy.cpu() if feature_axis == 1 else dy.cpu().t()
    y_ref, dx_ref, dw_ref = reference_matmul(x_feat, w.detach().cpu(), mask, slots, B, dy_feat)
    y_feat = y.detach().cpu() if feature_axis == 1 else y.detach().cpu().t()
    dx_feat = x.grad.cpu() if feature_axis == 1 else x.grad.cpu().t()
    assert_close(y_feat, y_ref, dtype, "y (gpu)")
    assert_close(dx_feat, dx_ref, dtype, "dx (gpu)")
    assert_close(w.grad.cpu(), dw_ref, dtype, "dw (gpu)")
    assert torch.all(y_feat[:, 7 * B:8 * B] == 0)
    assert torch.all(dx_feat[:, 5 * B:6 * B] == 0)
    assert torch.all(w.grad.cpu()[torch.as_tensor(dead_slots(slots, capacity))] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature_axis", [0, 1])
def test_gpu_realistic_sizes(feature_axis, dtype):
    """hidden 1024, N 256, B 32 on cuda tensors vs the float64 reference."""
    _gpu_case(feature_axis, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_linear_and_blog_example():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    np.random.seed(0)
    hidden_size, block_size, minibatch_size = 4096, 32, 64
    sparsity = np.random.randint(2, size=(hidden_size // block_size, hidden_size // block_size))
    bsmm = BlocksparseMatMul(sparsity, block_size=block_size)
    x = torch.randn(minibatch_size, hidden_size, device=dev)
    w = torch.randn(bsmm.w_shape, device=dev)
    y = bsmm(x, w)
    dense = dense_reference_numpy(w, sparsity, np.arange(int(sparsity.sum())), block_size)
    ref = torch.from_numpy(x.double().cpu().numpy() @ dense)
    assert_close(y, ref, torch.float32, "blog example on gpu")

    layout = numbasparse.layouts.random(32, 32, 0.3, seed=1)
    lin = numbasparse.BlockSparseLinear(1024, 1024, layout, block_size=32).to(dev)
    xin = torch.randn(256, 1024, device=dev)
    out = lin(xin)
    ref = xin.double().cpu() @ lin.to_dense().detach().double().cpu() + lin.bias.detach().double().cpu()
    assert_close(out, ref, torch.float32, "BlockSparseLinear on gpu")
