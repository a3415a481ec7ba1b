"""BlockSparseLinear and BlocksparseMatMul as torch modules / objects."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from numbasparse import BlockLayout, BlockSparseLinear, BlocksparseMatMul, layouts

from helpers import (assert_close, dead_slots, dense_reference, mask_with_empty,
                     permuted_layout, randn, rel_err)


def _module(B=16, in_blocks=4, out_blocks=3, seed=0, extra=2, bias=True, dtype=torch.float32):
    mask = mask_with_empty(in_blocks, out_blocks, 1, 2, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=extra, seed=seed + 1)
    torch.manual_seed(seed)
    m = BlockSparseLinear(in_blocks * B, out_blocks * B, layout, block_size=B, bias=bias, dtype=dtype)
    return m, mask, slots, capacity


def _reference(m, x, mask, slots):
    ref = x.double() @ dense_reference(m.weight.detach(), mask, slots, m.block_size)
    if m.bias is not None:
        ref = ref + m.bias.detach().double()
    return ref


@pytest.mark.parametrize("B", [8, 16, 32])
def test_construction_and_init(B):
    m, mask, slots, capacity = _module(B=B, seed=B)
    assert m.weight.shape == (capacity, B, B)
    assert m.bias.shape == (m.out_features,)
    assert m.in_features == 4 * B and m.out_features == 3 * B
    assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    w = m.weight.detach()
    assert torch.all(w[torch.as_tensor(dead_slots(slots, capacity))] == 0)  # dead slots zeroed
    fan_in = mask.sum(axis=0)
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        bound = 1 / np.sqrt(fan_in[j] * B)
        blk = w[s]
        assert blk.abs().max() <= bound and blk.abs().max() > 0.5 * bound
    assert "nnz=" in repr(m)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B", [8, 16, 32])
def test_forward_matches_to_dense_and_reference(B, bias):
    m, mask, slots, capacity = _module(B=B, seed=3 * B, bias=bias)
    x = randn((5, 7, m.in_features), torch.float32, 1)
    y = m(x)
    assert y.shape == (5, 7, m.out_features)
    assert_close(y, _reference(m, x, mask, slots), torch.float32, "module vs reference")
    dense = m.to_dense()
    assert dense.shape == (m.in_features, m.out_features)  # (in, out): y = x @ W + b
    assert torch.equal(dense.double(), dense_reference(m.weight.detach(), mask, slots, B))
    via_dense = x.double() @ dense.double() + (m.bias.double() if bias else 0)
    assert_close(y, via_dense, torch.float32, "module vs to_dense")
    # empty output block column 2 -> output is the bias exactly
    col = y[..., 2 * B:3 * B]
    expect = m.bias[2 * B:3 * B].expand_as(col) if bias else torch.zeros_like(col)
    assert torch.equal(col, expect)


def test_to_dense_is_differentiable():
    m, mask, slots, capacity = _module(B=8, seed=5)
    g = randn((m.in_features, m.out_features), torch.float32, 2)
    (m.to_dense() * g).sum().backward()
    expect = torch.zeros_like(m.weight)
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        expect[s] = g[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
    assert torch.equal(m.weight.grad, expect)


def test_gradcheck_with_bias():
    B = 8
    mask = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)
    layout = BlockLayout(mask, slots=[2, 0, 3], capacity=4)
    m = BlockSparseLinear(2 * B, 3 * B, layout, block_size=B, dtype=torch.float64)
    x = randn((2, 2 * B), torch.float64, 1, requires_grad=True)
    w = m.weight.detach().clone().requires_grad_(True)
    b = m.bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_backward_matches_reference():
    m, mask, slots, capacity = _module(B=16, seed=11)
    x = randn((9, m.in_features), torch.float32, 1, requires_grad=True)
    y = m(x)
    dy = randn(tuple(y.shape), torch.float32, 2)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = m.weight.detach().double().requires_grad_(True)
    b64 = m.bias.detach().double().requires_grad_(True)
    ref = x64 @ dense_reference(w64, mask, slots, 16) + b64
    dx, dw, db = torch.autograd.grad(ref, (x64, w64, b64), dy.double())
    assert_close(x.grad, dx, torch.float32, "dx")
    assert_close(m.weight.grad, dw, torch.float32, "dw")
    assert_close(m.bias.grad, db, torch.float32, "db")
    assert torch.all(m.weight.grad[torch.as_tensor(dead_slots(slots, capacity))] == 0)


@pytest.mark.parametrize("density", [None, 0.5, 1.0])
def test_from_dense_linear(density):
    B = 16
    torch.manual_seed(0)
    lin = nn.Linear(4 * B, 3 * B)
    with torch.no_grad():  # make block norms clearly distinct
        scale = torch.arange(1, 13, dtype=torch.float32).reshape(3, 4)[torch.randperm(3)]
        lin.weight.mul_(scale.repeat_interleave(B, 0).repeat_interleave(B, 1))
    m = BlockSparseLinear.from_dense(lin, block_size=B, density=density)
    expect_layout = layouts.from_dense(lin.weight.detach().t(), B, density=density)
    assert m.layout == expect_layout
    assert m.layout.nnz == (12 if density in (None, 1.0) else 6)
    block_mask = torch.from_numpy(m.layout.mask).repeat_interleave(B, 0).repeat_interleave(B, 1)
    masked = lin.weight.detach().t() * block_mask
    assert torch.equal(m.to_dense(), masked)
    x = randn((6, 4 * B), torch.float32, 3)
    ref = x.double() @ masked.double() + lin.bias.detach().double()
    assert_close(m(x), ref, torch.float32, "from_dense")
    if density in (None, 1.0):
        assert_close(m(x), lin(x).detach().double(), torch.float32, "full density == nn.Linear")


def test_from_dense_threshold_and_no_bias():
    B = 8
    lin = nn.Linear(2 * B, 2 * B, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(randn((2 * B, 2 * B), torch.float64, 4))
        lin.weight[:B, B:] = 0  # block (in 1, out 0) of W^T is zero
    m = BlockSparseLinear.from_dense(lin, block_size=B, threshold=1e-12)
    assert m.bias is None and m.weight.dtype == torch.float64
    np.testing.assert_array_equal(m.layout.mask, [[1, 1], [0, 1]])
    x = randn((3, 2 * B), torch.float64, 5)
    assert_close(m(x), x @ lin.weight.t(), torch.float64, "threshold from_dense")


def test_state_dict_into_module_with_other_layout():
    src, mask, slots, capacity = _module(B=8, seed=21, extra=3)
    dst = BlockSparseLinear(src.in_features, src.out_features, layouts.dense(4, 3), block_size=8)
    assert dst.weight.shape != src.weight.shape
    sd = src.state_dict()
    assert "_extra_state" in sd
    dst.load_state_dict(sd)
    assert dst.layout == src.layout
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    x = randn((4, src.in_features), torch.float32, 1)
    assert torch.equal(dst(x), src(x))
    # mutating the source afterwards does not leak into the loaded module
    with torch.no_grad():
        src.weight.add_(1)
    assert not torch.equal(dst.weight, src.weight)


def test_state_dict_after_compact_round_trips():
    src, mask, slots, capacity = _module(B=8, seed=22, extra=3)
    dst, *_ = _module(B=8, seed=23, extra=0)
    src.compact()
    dst.load_state_dict(src.state_dict())
    assert dst.layout == src.layout and dst.weight.shape == (src.layout.nnz, 8, 8)
    x = randn((4, src.in_features), torch.float32, 1)
    assert torch.equal(dst(x), src(x))


def test_load_state_dict_rejects_other_block_size():
    src, *_ = _module(B=8, seed=24)
    other = BlockSparseLinear(4 * 16, 3 * 16, layouts.dense(4, 3), block_size=16)
    with pytest.raises(RuntimeError, match=r"the checkpoint has block_size 8, the module has 16"):
        other.load_state_dict(src.state_dict())


def test_load_state_dict_rejects_other_layout_shape_and_stays_usable():
    """A rejected checkpoint (layout of another shape) must not leave the module with a
    weight storage that no longer fits its own layout."""
    src, *_ = _module(B=8, seed=25)                        # layout (4, 3)
    wide = BlockSparseLinear(5 * 8, 3 * 8, layouts.dense(5, 3), block_size=8)
    with pytest.raises(RuntimeError, match=r"layout has shape \(4, 3\), the module's \(5, 3\)"):
        wide.load_state_dict(src.state_dict())
    assert wide.layout == layouts.dense(5, 3)
    assert wide.weight.shape == (wide.layout.capacity, 8, 8), \
        f"weight storage {tuple(wide.weight.shape)} no longer fits the layout (capacity {wide.layout.capacity})"
    wide(randn((2, 40), torch.float32, 1))  # still usable


def test_torch_save_load_module_and_state_dict(tmp_path):
    m, mask, slots, capacity = _module(B=16, seed=31)
    x = randn((3, m.in_features), torch.float32, 1)
    torch.save(m, tmp_path / "m.pt")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded.layout == m.layout
    assert torch.equal(loaded(x), m(x))
    fresh = BlockSparseLinear(m.in_features, m.out_features, layouts.dense(4, 3), block_size=16)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=False))
    assert fresh.layout == m.layout
    assert torch.equal(fresh(x), m(x))


def test_state_dict_loads_with_default_torch_load():
    """torch.load defaults to weights_only=True (torch >= 2.6): a BlockSparseLinear
    checkpoint (layout in the extra state) should load without opting out of it."""
    m, *_ = _module(B=8, seed=32)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)  # default weights_only
    fresh = BlockSparseLinear(m.in_features, m.out_features, layouts.dense(4, 3), block_size=8)
    fresh.load_state_dict(sd)
    assert fresh.layout == m.layout


def test_deepcopy_module():
    import copy

    m, *_ = _module(B=8, seed=33)
    clone = copy.deepcopy(m)
    assert clone.layout == m.layout and clone.weight is not m.weight
    x = randn((3, m.in_features), torch.float32, 1)
    assert torch.equal(clone(x), m(x))


def test_to_float64():
    m, mask, slots, capacity = _module(B=8, seed=41)
    layout = m.layout
    m = m.to(torch.float64)
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert m.layout is layout
    x = randn((5, m.in_features), torch.float64, 1)
    assert_close(m(x), _reference(m, x, mask, slots), torch.float64, "float64 module")
    with pytest.raises(TypeError, match="dtype"):
        m(x.float())


def test_no_grad():
    m, *_ = _module(B=8, seed=42)
    x = randn((5, m.in_features), torch.float32, 1, requires_grad=True)
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad and y.grad_fn is None
    with torch.inference_mode():
        y2 = m(x)
    assert torch.equal(y, y2)


def test_compact_keeps_outputs():
    m, mask, slots, capacity = _module(B=16, seed=51, extra=4)
    m.set_layout(m.layout.remove(*np.argwhere(mask)[0]))
    x = randn((6, m.in_features), torch.float32, 1)
    before = m(x).detach()
    old_capacity = m.weight.shape[0]
    out = m.compact()
    assert out is m
    assert m.weight.shape == (m.layout.nnz, 16, 16) and m.weight.shape[0] < old_capacity
    assert m.layout.capacity == m.layout.nnz
    np.testing.assert_array_equal(m.layout.slots, np.arange(m.layout.nnz))
    assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    assert torch.equal(m(x), before)


def test_set_layout():
    m, mask, slots, capacity = _module(B=8, seed=61, extra=2)
    x = randn((4, m.in_features), torch.float32, 1)
    i, j = np.argwhere(mask)[0]
    smaller = m.layout.remove(i, j)
    m.set_layout(smaller)
    assert m.layout is smaller
    new_mask = mask.copy()
    new_mask[i, j] = False
    new_slots = [s for (r, c), s in zip(zip(*np.nonzero(mask)), slots) if (r, c) != (i, j)]
    assert_close(m(x), _reference(m, x, new_mask, new_slots), torch.float32, "after set_layout")
    # the freed slot can be reused for a new block: the stored weights follow their slot
    grown = smaller.add(1, 2)  # (1, 2) was empty
    m.set_layout(grown)
    s_new = grown.slot_of(1, 2)
    assert s_new in dead_slots(new_slots, capacity)
    assert_close(m(x), _reference(m, x, grown.mask, grown.slots), torch.float32, "after add")
    with pytest.raises(ValueError, match="shape"):
        m.set_layout(layouts.dense(3, 3))
    with pytest.raises(ValueError, match="capacity"):
        m.set_layout(mask)  # compact capacity != storage


def test_optimizer_step_changes_live_weights_only():
    m, mask, slots, capacity = _module(B=8, seed=71, extra=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = randn((32, m.in_features), torch.float32, 1)
    target = randn((32, m.out_features), torch.float32, 2)
    before = m.weight.detach().clone()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    live = torch.as_tensor(slots)
    dead = torch.as_tensor(dead_slots(slots, capacity))
    assert torch.all((m.weight.detach()[live] - before[live]).abs().sum(dim=(1, 2)) > 0)
    assert torch.all(m.weight.detach()[dead] == 0)
    assert losses[-1] < losses[0]


def test_sequential_training_reduces_loss():
    torch.manual_seed(0)
    net = nn.Sequential(BlockSparseLinear(64, 64, layouts.random(4, 4, 0.5, seed=1), block_size=16),
                        nn.ReLU(),
                        BlockSparseLinear(64, 32, layouts.random(8, 4, 0.5, seed=2), block_size=8))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = randn((64, 64), torch.float32, 1)
    target = randn((64, 32), torch.float32, 2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.9 * first


# ------------------------------------------------------------- BlocksparseMatMul
def test_blocksparse_matmul_object():
    mask = mask_with_empty(3, 5, 0, 4, seed=3)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=4)
    for axis in (0, 1):
        bsmm = BlocksparseMatMul(layout, block_size=16, feature_axis=axis)
        assert bsmm.w_shape == (capacity, 16, 16)
        assert bsmm.blocks == layout.nnz
        assert (bsmm.C, bsmm.K) == (48, 80)
        assert bsmm.i_shape(7) == ((7, 48) if axis == 1 else (48, 7))
        assert bsmm.o_shape(7) == ((7, 80) if axis == 1 else (80, 7))
        x = randn(bsmm.i_shape(7), torch.float32, 1)
        w = randn(bsmm.w_shape, torch.float32, 2)
        y = bsmm(x, w)
        assert tuple(y.shape) == bsmm.o_shape(7)
        dense = dense_reference(w, mask, slots, 16)
        ref = x.double() @ dense if axis == 1 else dense.t() @ x.double()
        assert_close(y, ref, torch.float32, f"bsmm axis {axis}")
        assert rel_err(bsmm.fprop_test(x, w), ref) < 1e-5
        assert "BlocksparseMatMul" in repr(bsmm)
