"""Non-finite and edge values: a clear ValueError / TypeError / IndexError, or the
correct result - never a silent drop, wrap-around or broadcast."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import learn
import numbasparse
from numbasparse import BlockLayout, BlockSparseConv2d, BlockSparseLinear, BlocksparseMatMul, layouts
from numbasparse.nn import blocks_to_dense, dense_to_blocks

B = 8


# ------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_from_dense_refuses_non_finite_weights(bad):
    weight = np.random.default_rng(0).standard_normal((4 * B, 3 * B))
    weight[B + 2, 2 * B + 1] = bad                      # inside block (1, 2)
    for call in (lambda: layouts.from_dense(weight, B),
                 lambda: layouts.from_dense(weight, B, density=0.5),
                 lambda: layouts.from_dense(weight, B, threshold=0.1),
                 lambda: layouts.block_norms(torch.from_numpy(weight), B)):
        with pytest.raises(ValueError, match=r"1 non-finite entries .* first at \(10, 17\)"):
            call()
    linear = nn.Linear(4 * B, 3 * B)
    with torch.no_grad():
        linear.weight[2 * B + 1, B + 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        BlockSparseLinear.from_dense(linear, block_size=B, density=0.5)
    conv = nn.Conv2d(2 * B, 2 * B, 3)
    with torch.no_grad():
        conv.weight[3, 9, 1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        BlockSparseConv2d.from_dense(conv, block_size=B)


# ------------------------------------------------------------------ empty sides
def test_layer_without_input_blocks_outputs_its_bias():
    layout = BlockLayout(np.zeros((0, 3), dtype=bool))
    layer = BlockSparseLinear(0, 3 * B, layout, block_size=B)
    x = torch.randn(5, 0, requires_grad=True)
    y = layer(x)
    assert y.shape == (5, 3 * B)
    torch.testing.assert_close(y, layer.bias.expand(5, -1))
    y.sum().backward()
    assert x.grad.shape == (5, 0) and layer.weight.grad.shape == (0, B, B)
    torch.testing.assert_close(layer.bias.grad, torch.full((3 * B,), 5.0))
    y = numbasparse.block_sparse_matmul(torch.randn(2, 7, 0), torch.empty(0, B, B), layout, B)
    assert y.shape == (2, 7, 3 * B) and torch.all(y == 0)


def test_layer_without_output_blocks():
    layout = BlockLayout(np.zeros((3, 0), dtype=bool))
    layer = BlockSparseLinear(3 * B, 0, layout, block_size=B)
    x = torch.randn(4, 3 * B, requires_grad=True)
    y = layer(x)
    assert y.shape == (4, 0)
    (y.sum() + x.sum()).backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


# ------------------------------------------------------------------ indices
@pytest.mark.parametrize("i, j", [(-1, 0), (0, -1), (4, 0), (0, 3)])
def test_slot_of_refuses_coordinates_outside_the_layout(i, j):
    layout = layouts.dense(4, 3)
    with pytest.raises(IndexError, match=r"outside the layout's shape \(4, 3\)"):
        layout.slot_of(i, j)
    assert layout.slot_of(3, 2) == 11


@pytest.mark.parametrize("edit", ["remove", "add"])
def test_layout_edits_refuse_negative_coordinates(edit):
    layout = layouts.dense(3, 3).remove([2], [2]) if edit == "add" else layouts.dense(3, 3)
    with pytest.raises(ValueError, match="block indices out of range"):
        getattr(layout, edit)([-1], [2])


@pytest.mark.parametrize("method", ["kill_", "reset_", "compact_"])
@pytest.mark.parametrize("index, error", [([-1], IndexError), ([6], IndexError), ([0.5], TypeError),
                                          (torch.tensor([True, False]), TypeError)])
def test_gate_edits_refuse_indices_outside_the_gates(method, index, error):
    gate = learn.HardConcreteGate(6, seed=0)
    before = gate.log_alpha.detach().clone()
    with pytest.raises(error, match=r"gate indices"):
        getattr(gate, method)(index)
    assert torch.equal(gate.log_alpha.detach(), before) and gate.n == 6


def test_slots_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="int32"):
        BlockLayout(np.ones((1, 1), dtype=bool), [2**31])
    with pytest.raises(ValueError, match="int32"):
        BlockLayout(np.ones((1, 2), dtype=bool), [0, 1], capacity=2**31 + 5)
    with pytest.raises(ValueError, match="int32"):
        BlockLayout(np.ones((1, 1), dtype=bool), np.array([2**63], dtype=np.uint64))
    largest = BlockLayout(np.ones((1, 1), dtype=bool), [2**31 - 2])
    assert largest.capacity == 2**31 - 1 and largest.slot_of(0, 0) == 2**31 - 2


# ------------------------------------------------------------------ gate noise
@pytest.mark.parametrize("shape", [(1,), (6, 1), (5,), ()])
def test_gate_noise_of_the_wrong_shape_is_refused(shape):
    gate = learn.HardConcreteGate(6, seed=0)
    with pytest.raises(ValueError, match=r"u must be a tensor of shape \(6,\)"):
        gate.sample(torch.full(shape, 0.5))
    with pytest.raises(ValueError, match=r"u must be a tensor"):
        gate.sample([0.5] * 6)
    u = torch.full((6,), 0.5)
    torch.testing.assert_close(gate.sample(u), gate.sample(u.clone()))


# ------------------------------------------------------------------ numpy integers
NUMPY_INTS = [np.int64(B), np.int32(B), np.uint8(B)]


@pytest.mark.parametrize("size", NUMPY_INTS, ids=lambda v: type(v).__name__)
def test_numpy_integer_block_sizes_are_accepted_everywhere(size):
    mask = np.ones((2, 2), dtype=bool)
    built = [
        BlockSparseLinear(2 * B, 2 * B, mask, block_size=size),
        BlockSparseLinear.from_dense(nn.Linear(2 * B, 2 * B), block_size=size),
        BlockSparseConv2d(2 * B, 2 * B, 3, mask, block_size=size),
        BlockSparseConv2d.from_dense(nn.Conv2d(2 * B, 2 * B, 3), block_size=size),
        learn.L0BlockSparseLinear(2 * B, 2 * B, block_size=size),
        learn.L0BlockSparseConv2d(2 * B, 2 * B, 3, block_size=size),
    ]
    for module in built:
        assert module.block_size == B and type(module.block_size) is int
    assert BlocksparseMatMul(mask, block_size=size).block_size == B
    assert layouts.from_dense(np.ones((2 * B, 2 * B)), size).shape == (2, 2)
    w = torch.randn(4, B, B)
    x = torch.randn(3, 2 * B)
    torch.testing.assert_close(numbasparse.block_sparse_matmul(x, w, mask, size),
                               numbasparse.block_sparse_matmul(x, w, mask, B))
    torch.testing.assert_close(dense_to_blocks(blocks_to_dense(w, mask, size), mask, size), w)


@pytest.mark.parametrize("size", [8.0, np.float64(8.0), True, "8"], ids=repr)
def test_non_integer_block_sizes_are_refused_everywhere(size):
    mask = np.ones((2, 2), dtype=bool)
    calls = [
        lambda: BlockSparseLinear(2 * B, 2 * B, mask, block_size=size),
        lambda: BlockSparseLinear.from_dense(nn.Linear(2 * B, 2 * B), block_size=size),
        lambda: BlockSparseConv2d(2 * B, 2 * B, 3, mask, block_size=size),
        lambda: learn.L0BlockSparseLinear(2 * B, 2 * B, block_size=size),
        lambda: learn.L0BlockSparseConv2d(2 * B, 2 * B, 3, block_size=size),
        lambda: BlocksparseMatMul(mask, block_size=size),
        lambda: numbasparse.block_sparse_matmul(torch.randn(3, 2 * B), torch.randn(4, B, B), mask, size),
        lambda: blocks_to_dense(torch.randn(4, B, B), mask, size),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="block_size must be one of"):
            call()


def test_numpy_integers_for_counts_and_threads():
    assert layouts.random(np.int64(4), np.int32(3), 0.5, seed=np.int64(1)).shape == (4, 3)
    assert layouts.dense(np.int64(2), np.int64(3)).shape == (2, 3)
    assert learn.HardConcreteGate(np.int64(5), seed=np.int64(3)).n == 5
    assert BlockLayout(np.ones((2, 2)), np.array([3, 2, 1, 0], dtype=np.int32), np.int64(6)).capacity == 6
    previous = numbasparse.get_num_threads()
    try:
        numbasparse.set_num_threads(np.int64(1))
        assert numbasparse.get_num_threads() == 1
    finally:
        numbasparse.set_num_threads(None)
    assert numbasparse.get_num_threads() == previous
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            numbasparse.set_num_threads(bad)


# ------------------------------------------------------------------ dense <-> blocks
def test_dense_block_conversions_check_shapes():
    mask = np.ones((2, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"w must be a tensor of shape \(capacity, B, B\) = \(6, 8, 8\)"):
        blocks_to_dense(torch.randn(5, B, B), mask, B)
    with pytest.raises(ValueError, match=r"dense must be a tensor of shape .* = \(16, 24\)"):
        dense_to_blocks(torch.randn(24, 16), mask, B)
