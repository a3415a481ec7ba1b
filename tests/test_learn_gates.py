"""Hard-concrete gates, gated layers and the L0 penalty against closed forms."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
from learn import HardConcreteGate, L0BlockSparseLinear, l0_penalty
from numbasparse import BlockLayout, block_sparse_matmul
from numbasparse.nn import blocks_to_dense

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def logit(p):
    return math.log(p / (1 - p))


def fresh_seed():
    return int(np.random.SeedSequence().generate_state(1)[0])


def random_layout(in_blocks, out_blocks, density, seed, extra=0):
    """Random mask; live blocks in shuffled slots of a storage with ``extra`` free slots."""
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < density
    mask[0, 0] = True
    nnz = int(mask.sum())
    slots = rng.permutation(nnz + extra)[:nnz]
    return BlockLayout(mask, slots, nnz + extra)


# ----------------------------------------------------------------- gate formulas
def test_sample_statistics_match_closed_forms():
    seed = fresh_seed()
    levels = np.array([-3.0, -1.0, 0.0, 1.5, 4.0])
    per = 40000
    gate = HardConcreteGate(levels.size * per, seed=seed, dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(np.repeat(levels, per)))
    z = gate.sample().detach().numpy().reshape(levels.size, per)
    assert z.min() >= 0.0 and z.max() <= 1.0
    p_nonzero = sigmoid(levels - BETA * math.log(-GAMMA / ZETA))
    np.testing.assert_allclose(gate.prob_nonzero().detach().numpy().reshape(levels.size, per)[:, 0], p_nonzero,
                               rtol=1e-12)
    # P(z == 1) = P(s > (1-gamma)/(zeta-gamma)) = sigmoid(log_alpha - beta*logit((1-gamma)/(zeta-gamma)))
    p_one = sigmoid(levels - BETA * logit((1 - GAMMA) / (ZETA - GAMMA)))
    for k in range(levels.size):
        sd = math.sqrt(p_nonzero[k] * (1 - p_nonzero[k]) / per)
        assert abs((z[k] > 0).mean() - p_nonzero[k]) < 5 * sd + 1e-9
        sd1 = math.sqrt(p_one[k] * (1 - p_one[k]) / per)
        assert abs((z[k] == 1).mean() - p_one[k]) < 5 * sd1 + 1e-9


def test_sample_formula_for_given_noise():
    gate = HardConcreteGate(7, seed=fresh_seed(), dtype=torch.float64)
    rng = np.random.default_rng(fresh_seed())
    la = rng.normal(0, 3, 7)
    u = rng.uniform(0.01, 0.99, 7)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(la))
    z = gate.sample(torch.tensor(u)).detach().numpy()
    s = sigmoid((np.log(u) - np.log(1 - u) + la) / BETA)
    np.testing.assert_allclose(z, np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1), rtol=1e-12, atol=1e-15)
    noise = gate.noise().numpy()
    assert noise.min() >= gate.eps and noise.max() <= 1 - gate.eps


def test_deterministic_gate_and_modes():
    gate = HardConcreteGate(6, seed=fresh_seed(), dtype=torch.float64)
    la = np.array([-6.0, math.log(-GAMMA / ZETA) - 1e-3, -1.0, 0.3, 2.3, 5.0])
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(la))
    expected = np.clip(sigmoid(la) * (ZETA - GAMMA) + GAMMA, 0, 1)
    np.testing.assert_allclose(gate.deterministic().detach().numpy(), expected, rtol=1e-12)
    assert expected[0] == 0 and expected[1] == 0 and expected[-1] == 1 and 0 < expected[2] < 1
    gate.eval()
    np.testing.assert_allclose(gate().detach().numpy(), expected, rtol=1e-12)
    gate.train()
    with torch.no_grad():
        gate.log_alpha.zero_()  # P(0 < z < 1) ~ 0.6 per gate
    a, b = gate().detach(), gate().detach()
    assert not torch.equal(a, b)  # fresh noise per call in training mode
    # below zero_gate_probability the evaluation gate is exactly zero
    p_star = learn.zero_gate_probability()
    assert abs(p_star - sigmoid((1 - BETA) * math.log(-GAMMA / ZETA))) < 1e-12


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.999])
def test_init_keep_sets_prob_nonzero(keep):
    gate = HardConcreteGate(5, init_keep=keep, dtype=torch.float64, seed=1)
    np.testing.assert_allclose(gate.prob_nonzero().detach().numpy(), keep, rtol=1e-12)
    assert gate.init_log_alpha == pytest.approx(logit(keep) + BETA * math.log(-GAMMA / ZETA), rel=1e-12)


def test_gate_noise_restored_from_state_dict():
    gate = HardConcreteGate(50, seed=fresh_seed())
    gate()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in gate.state_dict().items()}
    expected = [gate().detach() for _ in range(3)]
    other = HardConcreteGate(50, seed=fresh_seed())
    other.load_state_dict(state)
    for e in expected:
        assert torch.equal(other().detach(), e)


@pytest.mark.parametrize("kwargs, error", [
    ({"n": -1}, ValueError), ({"n": 2.5}, TypeError), ({"n": 3, "beta": 0}, ValueError),
    ({"n": 3, "gamma": 0.1}, ValueError), ({"n": 3, "zeta": 0.9}, ValueError),
    ({"n": 3, "init_keep": 1.0}, ValueError), ({"n": 3, "init_keep": 0}, ValueError),
    ({"n": 3, "eps": 0.7}, ValueError), ({"n": 3, "seed": -2}, ValueError),
    ({"n": 3, "beta": float("nan")}, TypeError),
])
def test_gate_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        HardConcreteGate(**kwargs)


# ----------------------------------------------------------------- gated layer
def dense_reference(layer, z, x):
    """x @ dense(W * z) + bias in float64, the dense matrix assembled from the mask."""
    B = layer.block_size
    layout = layer.layout
    w = (layer.weight.detach().double() * z.double()[:, None, None])
    dense = torch.zeros(layer.in_features, layer.out_features, dtype=torch.float64)
    for i, j in zip(*np.nonzero(layout.mask)):
        dense[i * B:(i + 1) * B, j * B:(j + 1) * B] = w[layout.slot_of(i, j)]
    return x.double() @ dense + layer.bias.detach().double()


@pytest.mark.parametrize("extra", [0, 5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gated_linear_matches_dense_reference(extra, mode):
    seed = fresh_seed()
    layout = random_layout(3, 4, 0.6, seed, extra)
    torch.manual_seed(seed)
    layer = L0BlockSparseLinear(24, 32, layout, block_size=8, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.log_alpha.normal_(0, 2)
        layer.weight.normal_()
    x = torch.randn(5, 24, dtype=torch.float64)
    if mode == "eval":
        layer.eval()
        z = layer.gate.deterministic().detach()
    else:
        state = layer.gate.noise_counter.clone()
        z = layer.gate.sample().detach()
        layer.gate.noise_counter.copy_(state)
    y = layer(x)
    torch.testing.assert_close(y, dense_reference(layer, z, x), rtol=1e-12, atol=1e-12)
    # the kernel gets the gated blocks: exactly block_sparse_matmul(x, weight * z, layout)
    direct = block_sparse_matmul(x, layer.weight.detach() * z[:, None, None], layout, 8) + layer.bias
    torch.testing.assert_close(y, direct, rtol=0, atol=0)


def test_gated_linear_gradients_match_dense_autograd():
    seed = fresh_seed()
    layout = random_layout(4, 3, 0.5, seed, extra=4)
    torch.manual_seed(seed)
    layer = L0BlockSparseLinear(32, 24, layout, block_size=8, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.log_alpha.normal_(0, 1)
    x = torch.randn(6, 32, dtype=torch.float64)
    target = torch.randn(6, 24, dtype=torch.float64)
    layer.eval()  # deterministic gates: the dense reference can recompute them
    (layer(x) - target).pow(2).sum().backward()

    la = layer.gate.log_alpha.detach().clone().requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    z = torch.clamp(torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA, 0, 1)
    dense = blocks_to_dense(w * z[:, None, None], layout, 8)
    ((x @ dense + layer.bias.detach()) - target).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.gate.log_alpha.grad, la.grad, rtol=1e-10, atol=1e-12)
    free = torch.as_tensor(layout.free_slots())
    assert torch.all(layer.weight.grad[free] == 0) and torch.all(layer.gate.log_alpha.grad[free] == 0)


def test_free_slots_start_dead():
    layout = random_layout(3, 3, 0.5, fresh_seed(), extra=3)
    layer = L0BlockSparseLinear(24, 24, layout, block_size=8)
    free = layout.free_slots()
    assert torch.all(layer.gate.log_alpha[free] == learn.DEAD_LOG_ALPHA)
    assert torch.all(layer.gate.sample()[free] == 0)
    live = layout.slots
    torch.testing.assert_close(layer.gate.prob_nonzero()[live], torch.full((live.size,), 0.9))


def test_layer_defaults_to_dense_layout_and_rejects_bad_sizes():
    layer = L0BlockSparseLinear(32, 16, block_size=8)
    assert layer.layout.nnz == 8 and layer.gate.log_alpha.shape == (8,)
    with pytest.raises(ValueError):
        L0BlockSparseLinear(30, 16, block_size=8)


def test_compacted_layer_state_dict_round_trip():
    seed = fresh_seed()
    layout = random_layout(3, 4, 0.5, seed, extra=4)
    torch.manual_seed(seed)
    layer = L0BlockSparseLinear(24, 32, layout, block_size=8)
    x = torch.randn(3, 24)
    layer.eval()
    before = layer(x)
    layer.compact()
    assert layer.weight.shape[0] == layout.nnz == layer.gate.log_alpha.shape[0]
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    fresh = L0BlockSparseLinear(24, 32, random_layout(3, 4, 0.9, seed + 1), block_size=8).eval()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.layout == layer.layout
    torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)


# ----------------------------------------------------------------- penalty
def two_layer_model(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(L0BlockSparseLinear(16, 32, random_layout(2, 4, 0.8, seed, 2), block_size=8, dtype=dtype),
                          nn.ReLU(),
                          L0BlockSparseLinear(32, 32, random_layout(2, 2, 0.9, seed + 1, 1), block_size=16,
                                              dtype=dtype))
    with torch.no_grad():
        for _, layer in learn.gated_layers(model):
            live = torch.as_tensor(layer.layout.slots)
            layer.gate.log_alpha[live] = torch.randn(live.numel(), dtype=dtype) * 2
    return model


@pytest.mark.parametrize("weighting", ["blocks", "flops"])
def test_penalty_value_and_gradient_match_sigmoid_derivative(weighting):
    model = two_layer_model(fresh_seed())
    penalty = l0_penalty(model, weighting=weighting)
    penalty.backward()
    total = 0.0
    shift = BETA * math.log(-GAMMA / ZETA)
    for _, layer in learn.gated_layers(model):
        la = layer.gate.log_alpha.detach().numpy()
        p = sigmoid(la - shift)
        live = np.zeros(la.size, dtype=bool)
        live[layer.layout.slots] = True
        f = 1.0 if weighting == "blocks" else layer.block_size ** 2
        total += f * p[live].sum()
        analytic = np.where(live, f * p * (1 - p), 0.0)
        np.testing.assert_allclose(layer.gate.log_alpha.grad.numpy(), analytic, rtol=1e-10, atol=1e-14)
    assert penalty.item() == pytest.approx(total, rel=1e-12)


def test_target_density_penalty_is_a_hinge_on_expected_density():
    model = two_layer_model(fresh_seed())
    layers = [layer for _, layer in learn.gated_layers(model)]
    positions = sum(layer.layout.in_blocks * layer.layout.out_blocks for layer in layers)
    expected = sum(layer.prob_nonzero_live().sum().item() for layer in layers) / positions
    assert learn.expected_density(model).item() == pytest.approx(expected, rel=1e-12)
    target = expected / 2
    hinge = l0_penalty(model, target_density=target)
    assert hinge.item() == pytest.approx(expected - target, rel=1e-10)
    hinge.backward()
    shift = BETA * math.log(-GAMMA / ZETA)
    for layer in layers:
        p = sigmoid(layer.gate.log_alpha.detach().numpy() - shift)
        live = np.zeros(p.size, dtype=bool)
        live[layer.layout.slots] = True
        np.testing.assert_allclose(layer.gate.log_alpha.grad.numpy(), np.where(live, p * (1 - p) / positions, 0),
                                   rtol=1e-10, atol=1e-16)
        layer.gate.log_alpha.grad = None
    below = l0_penalty(model, target_density=min(1.0, expected + 0.05))
    assert below.item() == 0.0
    below.backward()
    assert all(torch.all(layer.gate.log_alpha.grad == 0) for layer in layers)


def test_flops_weighted_expected_density():
    model = two_layer_model(fresh_seed())
    num = den = 0.0
    for _, layer in learn.gated_layers(model):
        f = layer.block_size ** 2
        num += f * layer.prob_nonzero_live().sum().item()
        den += f * layer.layout.in_blocks * layer.layout.out_blocks
    assert learn.expected_density(model, "flops").item() == pytest.approx(num / den, rel=1e-12)


def test_penalty_rejects_bad_arguments():
    model = two_layer_model(fresh_seed())
    with pytest.raises(ValueError, match="gated layers"):
        l0_penalty(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="weighting"):
        l0_penalty(model, weighting="params")
    with pytest.raises(ValueError):
        l0_penalty(model, target_density=0.0)
    with pytest.raises(ValueError):
        l0_penalty(model, target_density=1.5)
    with pytest.raises(TypeError):
        l0_penalty(model, target_density="0.1")
    with pytest.raises(TypeError):
        l0_penalty("not a model")


# ----------------------------------------------------------------- gated conv
@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, "same", 2), (2, (0, 2), 1)])
@pytest.mark.parametrize("extra", [0, 2])
def test_gated_conv_forward_and_captured_gradient_match_dense_conv(stride, padding, dilation, extra):
    pytest.importorskip("numbasparse.nn_conv")
    seed = fresh_seed()
    torch.manual_seed(seed)
    layout = random_layout(2, 3, 0.6, seed, extra=extra)
    conv = learn.L0BlockSparseConv2d(16, 24, 3, layout, block_size=8, stride=stride, padding=padding,
                                     dilation=dilation, dtype=torch.float64)
    with torch.no_grad():
        conv.gate.log_alpha.normal_(0, 2)
    conv.eval()
    conv._arm_capture(True)
    x = torch.randn(2, 16, 9, 10, dtype=torch.float64)
    y = conv(x)
    target = torch.randn_like(y)
    (y - target).pow(2).sum().backward()

    dense = conv.effective_dense().detach().requires_grad_(True)  # (out, in, kh, kw)
    ref = F.conv2d(x, dense, conv.bias.detach(), stride=stride, padding=padding, dilation=dilation)
    (ref - target).pow(2).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv.captured_weight_grad(), dense.grad.permute(1, 0, 2, 3), rtol=1e-10, atol=1e-12)
    # gradients of weight and gates agree with the dense computation
    la = conv.gate.log_alpha.detach().clone().requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    z = torch.clamp(torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA, 0, 1)
    from numbasparse.conv import dense_conv_weight

    ref2 = F.conv2d(x, dense_conv_weight(w * z[:, None, None, None, None], layout, 8), conv.bias.detach(),
                    stride=stride, padding=padding, dilation=dilation)
    (ref2 - target).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.gate.log_alpha.grad, la.grad, rtol=1e-10, atol=1e-12)
    # the FLOPs weighting counts every tap at every output position
    assert conv.block_flops() == 8 * 8 * 9 * y.shape[2] * y.shape[3]
    p = conv.prob_nonzero_live().sum()
    assert l0_penalty(nn.Sequential(conv), "flops").item() == pytest.approx(p.item() * conv.block_flops(), rel=1e-12)


def test_gated_conv_train_mode_uses_sampled_gates_and_round_trips():
    pytest.importorskip("numbasparse.nn_conv")
    seed = fresh_seed()
    torch.manual_seed(seed)
    layout = random_layout(2, 2, 0.7, seed, extra=1)
    conv = learn.L0BlockSparseConv2d(16, 16, 3, layout, block_size=8, padding=1, dtype=torch.float64)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    state = conv.gate.noise_counter.clone()
    z = conv.gate.sample().detach()
    conv.gate.noise_counter.copy_(state)
    from numbasparse.conv import block_sparse_conv2d

    direct = block_sparse_conv2d(x, conv.weight.detach() * z[:, None, None, None, None], layout, 8, 1, 1, 1)
    torch.testing.assert_close(conv(x), direct + conv.bias.view(1, -1, 1, 1), rtol=0, atol=0)
    conv.eval()
    before = conv(x)
    conv.compact()
    assert conv.weight.shape[0] == conv.gate.log_alpha.shape[0] == layout.nnz
    fresh = learn.L0BlockSparseConv2d(16, 16, 3, block_size=8, padding=1, dtype=torch.float64).eval()
    fresh.load_state_dict(conv.state_dict())
    torch.testing.assert_close(fresh(x), before, rtol=1e-13, atol=1e-14)
