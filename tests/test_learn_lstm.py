"""learn.L0BlockSparseLSTM: gated recurrent blocks, a float64 dense reference through the
gates (one sample per call in training, deterministic in eval), DynamicSparsity to a target
density, compaction and checkpoints, and the captured gradient behind regrowth."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
from learn.layers import block_grad_norms
from numbasparse import BlockLayout, BlockSparseLSTM, layouts
from numbasparse.nn import blocks_to_dense

from helpers import randn
from test_lstm import ref_lstm

F64 = torch.float64
B, H, FEATURES = 8, 32, 6                 # recurrent layout (4, 16): 64 block positions


def make(seed=0, layout=None, **kw):
    torch.manual_seed(seed)
    return learn.L0BlockSparseLSTM(FEATURES, H, layout, block_size=B, seed=seed + 1, dtype=F64, **kw)


def reference(m, x, W, hx=None):
    """Float64 (output, h_n, c_n) of ``m`` with the dense recurrent weight ``W (H, 4H)``."""
    gx = x.detach() @ m.input_projection.weight.detach().t() + m.bias.detach()
    zeros = torch.zeros(x.shape[1], H, dtype=F64)
    h0, c0 = (zeros, zeros) if hx is None else (hx[0][0], hx[1][0])
    return ref_lstm(gx, W, h0, c0)


def check_eval(m, x, tol=1e-10):
    """Eval mode: the module equals the reference through ``recurrent.effective_dense()``."""
    m.eval()
    y, (h, c) = m(x)
    y_ref, h_ref, c_ref = reference(m, x, m.recurrent.effective_dense())
    for a, b in ((y, y_ref), (h[0], h_ref), (c[0], c_ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    return y.detach()


def test_defaults_dense_layout_and_gates():
    m = make()
    assert isinstance(m, BlockSparseLSTM) and isinstance(m.recurrent, learn.L0BlockSparseLinear)
    assert m.layout == layouts.dense(H // B, 4 * H // B)
    gate = m.recurrent.gate
    assert isinstance(gate, learn.HardConcreteGate) and gate.log_alpha.shape == (64,)
    torch.testing.assert_close(gate.prob_nonzero(), torch.full((64,), 0.9, dtype=F64))
    assert learn.gated_layers(m) == [("recurrent", m.recurrent)]
    torch.testing.assert_close(learn.l0_penalty(m), gate.prob_nonzero().sum())
    assert m.recurrent.block_flops() == B * B

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = make(1), learn.L0BlockSparseLinear(H, B, block_size=B, dtype=F64)

    net = Net()
    assert [name for name, _ in learn.gated_layers(net)] == ["lstm.recurrent", "head"]
    assert learn.gated_layers(net)[0][1] is net.lstm.recurrent
    with pytest.raises(ValueError, match="hidden_size=20 is not a multiple of block_size 8"):
        learn.L0BlockSparseLSTM(FEATURES, 20, block_size=B)


def test_eval_mode_matches_effective_dense_reference():
    mask = np.random.default_rng(0).random((4, 16)) < 0.6
    mask[2] = False                                             # an empty block row
    layout = BlockLayout(mask, slots=np.random.default_rng(1).permutation(mask.sum() + 3)[:mask.sum()],
                         capacity=int(mask.sum()) + 3)
    m = make(2, layout)
    with torch.no_grad():                                       # distinct gates, one closed exactly
        m.recurrent.gate.log_alpha.copy_(randn((layout.capacity,), F64, 3))
        m.recurrent.gate.log_alpha[layout.slot_of(0, 0)] = -6.0
    z = m.recurrent.gate.deterministic()
    assert z[layout.slot_of(0, 0)] == 0 and 0 < z[layout.slot_of(*np.argwhere(mask)[1])] < 1
    dense = m.recurrent.effective_dense()
    torch.testing.assert_close(dense, blocks_to_dense(m.recurrent.weight * z[:, None, None], layout, B))
    x = randn((5, 3, FEATURES), F64, 4)
    check_eval(m, x)
    hx = tuple(randn((1, 3, H), F64, 5 + k) for k in range(2))
    y, _ = m(x, hx)
    torch.testing.assert_close(y, reference(m, x, dense, hx)[0], rtol=1e-10, atol=1e-10)


def test_training_mode_one_gate_sample_per_call():
    m = make(3).train()
    gate = m.recurrent.gate
    x = randn((6, 2, FEATURES), F64, 1)
    counter = gate.noise_counter.clone()
    y, (h, c) = m(x)
    assert gate.noise_counter == counter + 1, "one gate sample per forward call, shared by every step"
    gate.noise_counter.copy_(counter)                           # replay the sample the call drew
    z = gate.sample().detach()
    assert not torch.equal(z, gate.deterministic()) and not torch.all(z == 1)
    y_ref, _, c_ref = reference(m, x, blocks_to_dense(m.recurrent.gated_weight(z), m.layout, B))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c[0], c_ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y, m.eval()(x)[0])                # sampled gates != deterministic gates
    y.sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def train(m, opt, ctrl, x, target, steps, target_density=None):
    reports = []
    for _ in range(steps):
        m.train()
        out, _ = m(x)
        loss = F.mse_loss(out, target) + learn.l0_penalty(m, target_density=target_density)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reports.append(ctrl.step())
    return [r for r in reports if r is not None]


def test_dynamic_sparsity_to_target_then_compact_and_checkpoint():
    m = make(4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ctrl = learn.DynamicSparsity(m, opt, every=5, target_density=0.5, ramp=20)
    x, target = randn((6, 4, FEATURES), F64, 1), randn((6, 4, H), F64, 2)
    reports = train(m, opt, ctrl, x, target, 20, target_density=0.5)
    assert len(reports) == 4
    densities = [r.density for r in reports]
    assert densities == sorted(densities, reverse=True) and densities[0] < 1.0
    assert m.layout.nnz == 32 and ctrl.density() == pytest.approx(0.5)
    assert m.layout.capacity == 64 and m.recurrent.weight.shape[0] == 64
    free = torch.as_tensor(m.layout.free_slots())
    assert torch.all(m.recurrent.weight.detach()[free] == 0) and torch.all(m.recurrent.gate.deterministic()[free] == 0)
    check_eval(m, x)                                             # free slots: gathered live blocks
    assert torch.isfinite(m.train()(x)[0]).all()
    train(m, opt, ctrl, x, target, 5, target_density=0.5)      # holds the target
    assert m.layout.nnz == 32
    before = check_eval(m, x)

    ctrl.compact()
    assert m.recurrent.weight.shape == (32, B, B) and m.recurrent.gate.log_alpha.shape == (32,)
    assert m.layout.capacity == 32
    torch.testing.assert_close(check_eval(m, x), before, rtol=1e-12, atol=1e-14)
    train(m, opt, ctrl, x, target, 2, target_density=0.5)      # the optimizer still trains it
    before = check_eval(m, x)

    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = make(99)
    assert fresh.layout != m.layout
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.layout == m.layout and fresh.recurrent.weight.shape == (32, B, B)
    fresh.eval()
    y, (h, c) = fresh(x)
    y_m, (h_m, c_m) = m.eval()(x)
    assert torch.equal(y, y_m) and torch.equal(h, h_m) and torch.equal(c, c_m)


def test_gradient_regrowth_uses_captured_dense_gradient():
    mask = np.random.default_rng(5).random((4, 16)) < 0.5
    m = make(5, BlockLayout(mask))                               # capacity == nnz: no free slot yet
    nnz = m.layout.nnz
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    ctrl = learn.DynamicSparsity(m, opt, every=2, regrow="gradient")
    x, target = randn((5, 3, FEATURES), F64, 1), randn((5, 3, H), F64, 2)
    assert train(m, opt, ctrl, x, target, 1) == []
    live = np.argwhere(mask)
    closing = [tuple(p) for p in live[[0, 5, 9]]]
    with torch.no_grad():
        for i, j in closing:
            m.recurrent.gate.log_alpha[m.layout.slot_of(i, j)] = -6.0

    gate = m.recurrent.gate
    counter = gate.noise_counter.clone()
    m.train()
    out, _ = m(x)
    loss = F.mse_loss(out, target)
    opt.zero_grad()
    loss.backward()
    gate.noise_counter.copy_(counter)
    W = blocks_to_dense(m.recurrent.gated_weight(gate.sample()), m.layout, B).detach().requires_grad_(True)
    y_ref, _, _ = reference(m, x, W)
    dW, = torch.autograd.grad(F.mse_loss(y_ref, target), W)
    captured = m.recurrent.captured_weight_grad()
    assert captured is not None and captured.shape == (H, 4 * H)
    torch.testing.assert_close(captured, dW, rtol=1e-10, atol=1e-12)   # every block position, live or not
    opt.step()

    report = ctrl.step()
    assert report is not None and ctrl.updates == 1
    assert m.layout.nnz == nnz                                   # 3 removed, 3 regrown
    for i, j in closing:
        assert not m.layout.mask[i, j]
    grown = np.argwhere(m.layout.mask & ~mask)
    assert len(grown) == 3
    norms = block_grad_norms(dW.detach(), m.layout.shape, B).numpy()
    norms[mask] = -1                                             # only dead blocks can regrow
    expect = np.argwhere(norms >= np.sort(norms.ravel())[-3])
    np.testing.assert_array_equal(grown, expect)
    for i, j in grown:
        s = m.layout.slot_of(i, j)
        assert torch.all(m.recurrent.weight[s] == 0)
        assert gate.prob_nonzero()[s].item() == pytest.approx(0.9)
    check_eval(m, x)
    assert len(train(m, opt, ctrl, x, target, 2)) == 1           # training and the next update go on
