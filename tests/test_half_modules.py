"""float16 and bfloat16 in PyTorch: every layer in 16-bit (``.half()``, ``.to(bfloat16)``,
float32 gates), autocast training with a GradScaler and without, errors for mixed
dtypes, and ``sparsify`` of 16-bit models.  The kernels' numerics are in
test_half_kernels.py."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import numbasparse
from numbasparse import BlockLayout, BlockSparseConv2d, BlockSparseLinear, backend
from numbasparse.functional import block_sparse_conv2d, block_sparse_matmul

from helpers import HALF, HALF_IDS, check_rel_16, half_randn, randn

learn = numbasparse.learn


# ====================================================================== modules in 16-bit
KINDS = ["linear", "conv", "l0_linear", "l0_conv"]


def _layer(kind, seed=0, dtype=None):
    torch.manual_seed(seed)
    B = 8
    mask = np.array([[True, False, True], [False, False, True], [True, False, False]])
    layout = BlockLayout(mask, capacity=int(mask.sum()) + 2)
    if kind == "linear":
        return BlockSparseLinear(3 * B, 3 * B, layout, block_size=B, dtype=dtype)
    if kind == "conv":
        return BlockSparseConv2d(3 * B, 3 * B, 3, layout, block_size=B, padding=1, stride=2, dtype=dtype)
    if kind == "l0_linear":
        return learn.L0BlockSparseLinear(3 * B, 3 * B, layout, block_size=B, seed=seed + 1, dtype=dtype)
    return learn.L0BlockSparseConv2d(3 * B, 3 * B, 3, layout, block_size=B, padding=1, seed=seed + 1, dtype=dtype)


def _input(kind, dtype, seed=1, batch=2):
    shape = (batch, 24, 5, 5) if kind.endswith("conv") else (batch, 24)
    return half_randn(shape, dtype, seed)


def _check_param_dtypes(layer, dtype):
    for name, p in layer.named_parameters():
        if name.endswith("log_alpha"):
            assert p.dtype == torch.float32, name
            assert p.grad is None or p.grad.dtype == torch.float32, name
        else:
            assert p.dtype == dtype, name
            assert p.grad is None or p.grad.dtype == dtype, name


@pytest.mark.parametrize("convert", ["to_bf16", "half"])
@pytest.mark.parametrize("kind", KINDS)
def test_modules_in_16_bit_train_and_round_trip_state_dict(kind, convert):
    dtype = torch.bfloat16 if convert == "to_bf16" else torch.float16
    layer = _layer(kind).train()
    # a float32 gradient already there before the conversion
    layer(_input(kind, torch.float32)).square().sum().backward()
    layer = layer.to(torch.bfloat16) if convert == "to_bf16" else layer.half()
    _check_param_dtypes(layer, dtype)
    if kind.startswith("l0"):
        assert layer.gate.log_alpha.grad is not None and layer.gate.log_alpha.grad.dtype == torch.float32
    layer.zero_grad(set_to_none=True)

    x = _input(kind, dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    _check_param_dtypes(layer, dtype)
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert layer.weight.grad.abs().sum() > 0
    if kind.startswith("l0"):
        g = layer.gate.log_alpha.grad
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0

    # 16-bit float64 reference of the same layer (eval: deterministic gates)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
        wide = copy.deepcopy(layer).double()
        check_rel_16(y_eval, wide(x.double()), dtype, f"{kind} eval vs float64 copy")

    # state_dict of the 16-bit layer into a fresh 16-bit layer
    fresh = _layer(kind, seed=7)
    fresh = fresh.to(torch.bfloat16) if convert == "to_bf16" else fresh.half()
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), y_eval)         # different before the load
    state = layer.state_dict()
    assert state["weight"].dtype == dtype
    fresh.load_state_dict(state)
    _check_param_dtypes(fresh, dtype)
    with torch.no_grad():
        assert torch.equal(fresh(x), y_eval)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("kind", ["l0_linear", "l0_conv"])
def test_gated_layers_built_in_16_bit_keep_a_float32_gate(kind, dtype):
    layer = _layer(kind, dtype=dtype).train()
    assert layer.weight.dtype == dtype and layer.gate.log_alpha.dtype == torch.float32
    x = _input(kind, dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.gate.log_alpha.grad.dtype == torch.float32 and layer.weight.grad.dtype == dtype
    # .float() brings the whole layer to float32, .double() to float64 (the gate too)
    assert layer.float().weight.dtype == torch.float32
    assert layer.double().gate.log_alpha.dtype == torch.float64


# ====================================================================== autocast training
def _regression_problem(seed=0):
    B = 8
    mask = np.array([[True, False], [True, True], [False, True], [True, False]])
    layout = BlockLayout(mask, capacity=6)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g)
    teacher = torch.randn(32, 16, generator=g) / 4
    target = x @ teacher
    torch.manual_seed(seed)
    model = nn.Sequential(BlockSparseLinear(32, 32, BlockLayout(np.ones((4, 4), dtype=bool)), block_size=B),
                          nn.Tanh(), BlockSparseLinear(32, 16, layout, block_size=B))
    return model, x, target


def test_grad_scaler_float16_training_and_skipped_inf_step():
    model, x, target = _regression_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
            assert out.dtype == torch.float16
            loss = F.mse_loss(out.float(), target)
        scaler.scale(loss).backward()
        for p in model.parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    scale = scaler.get_scale()
    assert np.isfinite(scale) and scale > 0
    assert scale > 2.0 ** 12, "no growth after 30 finite steps (growth_interval 5)"

    # an inf in the gradients: the step is skipped and the scale is backed off
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x).float(), target)
    scaler.scale(loss * float("inf")).backward()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale * 0.5
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)

    # the same with the inf put into one gradient just before the step
    scale = scaler.get_scale()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x).float(), target)
    scaler.scale(loss).backward()
    model[2].weight.grad[0, 0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale * 0.5
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)

    # and training goes on afterwards
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x).float(), target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "l0"])
def test_bfloat16_autocast_training_without_scaler(gated):
    model, x, target = _regression_problem(seed=1)
    if gated:
        torch.manual_seed(1)
        model = nn.Sequential(learn.L0BlockSparseLinear(32, 32, block_size=8, seed=2), nn.Tanh(),
                              learn.L0BlockSparseLinear(32, 16, block_size=8, seed=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        for p in model.parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


# ====================================================================== errors
def test_mixed_dtypes_raise_type_error_naming_both():
    B = 8
    layout = BlockLayout(np.ones((2, 2), dtype=bool))
    x_bf = torch.randn(3, 2 * B).bfloat16()
    x_h = torch.randn(3, 2 * B).half()
    w_h = torch.randn(4, B, B).half()
    w_f = torch.randn(4, B, B)
    with pytest.raises(TypeError, match=r"(?s)(bfloat16.*float16|float16.*bfloat16)"):
        block_sparse_matmul(x_bf, w_h, layout, B)
    with pytest.raises(TypeError, match=r"(?s)(float16.*float32|float32.*float16)"):
        block_sparse_matmul(x_h, w_f, layout, B)
    with pytest.raises(TypeError, match=r"(?s)(bfloat16.*float16|float16.*bfloat16)"):
        block_sparse_matmul(x_h, w_h, layout, B, bias=torch.zeros(2 * B, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"(?s)(bfloat16.*float16|float16.*bfloat16)"):
        backend.forward(x_bf, w_h, layout, B)
    with pytest.raises(TypeError, match=r"(?s)(float16.*float32|float32.*float16)"):
        backend.backward(x_h, x_h, w_f, layout, B)
    with pytest.raises(TypeError, match=r"(?s)(bfloat16.*float16|float16.*bfloat16)"):
        block_sparse_conv2d(torch.randn(1, 2 * B, 4, 4).bfloat16(), torch.randn(4, 3, 3, B, B).half(), layout, B)
    layer = BlockSparseLinear(2 * B, 2 * B, layout, block_size=B).half()
    with pytest.raises(TypeError, match=r"(?s)(bfloat16.*float16|float16.*bfloat16)"):
        layer(x_bf)


# ====================================================================== sparsify
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_sparsify_converts_16_bit_linear_layers(dtype):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(dtype).eval()
    x = half_randn((9, 32), dtype, 1)
    with torch.no_grad():
        want = dense(x)
        exact = copy.deepcopy(dense).double()(x.double())
    model, report = numbasparse.sparsify(copy.deepcopy(dense), density=1.0, block_size=8, return_report=True)
    assert isinstance(model[0], BlockSparseLinear) and isinstance(model[2], BlockSparseLinear), report
    assert model[0].weight.dtype == dtype and model[2].weight.dtype == dtype
    assert model[0].layout.nnz == 4 * 8 and model[2].layout.nnz == 8 * 2
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    check_rel_16(got, exact, dtype, "sparsified vs float64")
    check_rel_16(got, want.double(), dtype, "sparsified vs dense 16-bit")
    # backward in 16-bit through the converted model
    model.train()
    model(x).float().sum().backward()
    assert model[0].weight.grad.dtype == dtype and torch.isfinite(model[0].weight.grad).all()


    # density < 1 keeps the blocks of largest norm, ranked in float64 (a 16-bit norm of
    # these blocks would overflow in float16: 64 * 300**2 > 65504)
    big = nn.Linear(32, 16).to(dtype)
    with torch.no_grad():
        big.weight.copy_((randn((16, 32), torch.float64, 9) * 300).to(dtype))
    kept = numbasparse.sparsify(copy.deepcopy(big), density=0.5, block_size=8)
    assert isinstance(kept, BlockSparseLinear) and kept.weight.dtype == dtype
    norms = big.weight.detach().double().t().reshape(4, 8, 2, 8).pow(2).sum(dim=(1, 3))
    top = torch.zeros(8, dtype=torch.bool)
    top[norms.flatten().argsort(descending=True)[:4]] = True
    assert np.array_equal(kept.layout.mask, top.reshape(4, 2).numpy())
    xb = half_randn((3, 32), dtype, 10)
    with torch.no_grad():
        masked = big.weight.detach().double().t() * torch.from_numpy(
            np.kron(kept.layout.mask, np.ones((8, 8))))
        check_rel_16(kept(xb), xb.double() @ masked + big.bias.detach().double(), dtype, "sparsified at density 0.5")
