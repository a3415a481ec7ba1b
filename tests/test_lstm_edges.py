"""BlockSparseLSTM at its edges: clear errors for bad arguments, layouts.lstm_gates,
checkpoints, 16-bit and autocast, torch.compile, and the float32 cell kernel at extreme
and NaN pre-activations."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from numbasparse import BlockLayout, BlockSparseLSTM, layouts
from numbasparse.functional import block_sparse_lstm
from numbasparse.kernels.cpu import lstm_cell

from helpers import HALF, HALF_IDS, check_rel_16, dense_reference, raises, randn
from test_lstm import full_module, module_reference, ref_lstm, sparse_module, states, two_layouts

F64 = torch.float64


# ------------------------------------------------------------------ errors
def _m(dtype=torch.float32, **kw):
    return BlockSparseLSTM(5, 16, layouts.dense(2, 8), block_size=8, dtype=dtype, **kw)


X = randn((4, 2, 5), torch.float32, 0)
S = torch.zeros(1, 2, 16)
GX, W = randn((3, 2, 64), torch.float32, 1), randn((16, 8, 8), torch.float32, 2)
ERRORS = [
    (lambda: _m()(randn((4, 2, 6), torch.float32, 0)), ValueError, r"input has 6 features .* input_size=5"),
    (lambda: _m()(X[0, 0]), ValueError, r"input must be 3-D .* or 2-D .* got shape \(5,\)"),
    (lambda: _m()(X[..., None]), ValueError, r"input must be 3-D .*got shape \(4, 2, 5, 1\)"),
    (lambda: _m()(X, (S[0], S[0])), ValueError, r"h_0 must have shape \(num_layers=1, N, H\) = \(1, 2, 16\), got \(2, 16\)"),
    (lambda: _m()(X, (S, torch.zeros(1, 3, 16))), ValueError, r"c_0 must have shape .*got \(1, 3, 16\)"),
    (lambda: _m()(X, (torch.zeros(1, 2, 24), S)), ValueError, r"h_0 must have shape .*got \(1, 2, 24\)"),
    (lambda: _m()(X[:, 0], (S, S)), ValueError, r"h_0 must have shape \(1, H\) = \(1, 16\) for an unbatched"),
    (lambda: _m()(X, S), TypeError, r"hx must be a tuple \(h_0, c_0\), got Tensor"),
    (lambda: _m()(X, (S.double(), S)), TypeError, r"h_0 is torch.float64 .* gx is torch.float32"),
    (lambda: _m(F64)(X.double(), (S, S.double())), TypeError, r"h_0 is torch.float32 .* gx is torch.float64"),
    (lambda: BlockSparseLSTM(8, 16, np.ones((2, 8)), block_size=8, input_layout=np.ones((1, 8)))(X.double()[..., :1]
                                                                                            .expand(4, 2, 8)),
     TypeError, r"input is torch.float64 on cpu but the layer.s weights are torch.float32"),
    (lambda: _m()(X.double()), TypeError, r"input is torch.float64 on cpu but the layer's weights are torch.float32"),
    (lambda: BlockSparseLSTM(5, 16, np.ones((2, 4)), block_size=8), ValueError, r"layout must have shape \(H/B, 4H/B\) = \(2, 8\)"),
    (lambda: BlockSparseLSTM(5, 20, np.ones((2, 8)), block_size=8), ValueError, r"hidden_size=20 is not a multiple of block_size 8"),
    (lambda: BlockSparseLSTM(5, 24, np.ones((2, 8)), block_size=12), ValueError, r"block_size must be one of \(8, 16, 32\)"),
    (lambda: BlockSparseLSTM(0, 16, np.ones((2, 8)), block_size=8), ValueError, r"input_size must be a positive integer"),
    (lambda: BlockSparseLSTM.from_dense(nn.LSTM(5, 16, num_layers=2), 8), ValueError, r"one-layer.*num_layers=2"),
    (lambda: BlockSparseLSTM.from_dense(nn.LSTM(5, 16, bidirectional=True), 8), ValueError, r"bidirectional=True"),
    (lambda: BlockSparseLSTM.from_dense(nn.LSTM(5, 16, proj_size=4), 8), ValueError, r"proj_size=4"),
    (lambda: BlockSparseLSTM.from_dense(nn.GRU(5, 16), 8), TypeError, r"expects an nn.LSTM, got GRU"),
    (lambda: BlockSparseLSTM.from_dense(nn.LSTM(5, 20), 8), ValueError, r"hidden_size=20 is not a multiple"),
    (lambda: block_sparse_lstm(GX[..., :60], W, layouts.dense(2, 8)), ValueError, r"gx must have shape \(T, N, 4H\) = \(T, N, 64\)"),
    (lambda: block_sparse_lstm(GX[0], W, layouts.dense(2, 8)), ValueError, r"gx must have shape \(T, N, 4H\)"),
    (lambda: block_sparse_lstm(GX, W[:15], layouts.dense(2, 8)), ValueError, r"w must have shape .*\(16, 8, 8\).*got \(15, 8, 8\)"),
    (lambda: block_sparse_lstm(GX, W, layouts.dense(4, 4)), ValueError, r"must have shape \(H/B, 4H/B\).*got \(4, 4\)"),
    (lambda: block_sparse_lstm(GX, W, layouts.dense(2, 8), torch.zeros(3, 16)), ValueError, r"h0 must have shape \(N, H\) = \(2, 16\)"),
    (lambda: block_sparse_lstm(GX.double(), W, layouts.dense(2, 8)), TypeError, r"gx is torch.float64 .* w is torch.float32"),
]


@pytest.mark.parametrize("fn,exc,match", ERRORS)
def test_bad_arguments_raise_clear_errors(fn, exc, match):
    raises(exc, match, fn)


# ------------------------------------------------------------------ lstm_gates
@pytest.mark.parametrize("hidden", ["mask", "watts_strogatz"])
def test_lstm_gates(hidden):
    base = layouts.watts_strogatz(6, 2, 0.3, seed=1) if hidden == "watts_strogatz" else \
        BlockLayout(np.random.default_rng(0).random((3, 3)) < 0.5)
    n = base.in_blocks
    fused = layouts.lstm_gates(base if hidden == "watts_strogatz" else base.mask)
    assert isinstance(fused, BlockLayout) and fused.shape == (n, 4 * n) and fused.nnz == 4 * base.nnz
    for gate in range(4):
        np.testing.assert_array_equal(fused.mask[:, gate * n:(gate + 1) * n], base.mask)
    m = BlockSparseLSTM(5, 8 * n, fused, block_size=8)
    assert m(randn((2, 1, 5), torch.float32, 0))[0].shape == (2, 1, 8 * n)
    with pytest.raises(ValueError, match="square"):
        layouts.lstm_gates(np.ones((2, 3)))


# ------------------------------------------------------------------ checkpoints
def test_state_dict_round_trip_after_compact_weights_only():
    src, *_ = sparse_module(True, torch.float32, seed=7)             # free slots hold NaN
    src.recurrent.compact()
    assert src.recurrent.weight.shape[0] == src.layout.nnz and not src.recurrent.weight.isnan().any()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = BlockSparseLSTM(16, 24, layouts.dense(3, 12), block_size=8, input_layout=layouts.dense(2, 12))
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert dst.layout == src.layout and dst.input_projection.layout == src.input_projection.layout
    x = randn((5, 2, 16), torch.float32, 1)
    for a, b in zip(torch.utils._pytree.tree_leaves(dst(x)), torch.utils._pytree.tree_leaves(src(x))):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ 16-bit and autocast
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_16bit_module_matches_float64_reference(dtype):
    m, rec, _ = sparse_module(False, torch.float32, seed=8)          # free slots hold NaN
    m = m.to(dtype)
    assert m.recurrent.weight.dtype == dtype and np.array_equal(m.layout.slots, rec[1])
    x = (0.5 * randn((5, 3, 16), F64, 1)).to(dtype).requires_grad_(True)
    y, (h, c) = m(x)
    assert y.dtype == h.dtype == c.dtype == dtype
    dy = randn(tuple(y.shape), F64, 2).to(dtype)
    ((y * dy).sum() + h.sum() - c.sum()).backward()
    zeros = (torch.zeros(1, 3, 24),) * 2
    (y_ref, h_ref, c_ref), (dx, dw, dw_in, db) = module_reference(m, rec, (None, None), x, zeros, dy)
    check_rel_16(y, y_ref, dtype, "output")
    check_rel_16(c[0], c_ref, dtype, "c_n")
    for what, got, ref in (("dx", x.grad, dx), ("dw", m.recurrent.weight.grad, dw), ("db", m.bias.grad, db)):
        assert got.dtype == dtype
        check_rel_16(got, ref, dtype, what)


def test_autocast_bf16_output_and_float32_grads():
    m, (mask, slots), _ = sparse_module(False, torch.float32, seed=9)          # free slots hold NaN
    x = randn((4, 2, 16), torch.float32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = m(x)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    zeros = torch.zeros(2, 24, dtype=F64)
    W = dense_reference(m.recurrent.weight.detach(), mask, slots, 8)
    y_ref, _, _ = ref_lstm(m.input_projection(x).detach().double(), W, zeros, zeros)
    check_rel_16(y, y_ref, torch.bfloat16, "autocast output")


# ------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    m = full_module(two_layouts()[0], 3)
    x = randn((4, 2, 5), F64, 1, requires_grad=True)
    hx = states(2, 16, F64, 2)
    compiled = torch.compile(m, fullgraph=True)
    y, (h, c) = compiled(x, hx)
    (y.square().sum() + c.sum()).backward()
    got = [y, h, c, x.grad, hx[0].grad] + [p.grad for p in m.parameters()]
    x.grad = hx[0].grad = hx[1].grad = None
    m.zero_grad()
    y_e, (h_e, c_e) = m(x, hx)
    (y_e.square().sum() + c_e.sum()).backward()
    want = [y_e, h_e, c_e, x.grad, hx[0].grad] + [p.grad for p in m.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ float32 cell kernel
def cell_case(seed=0, n=4, hidden=16):
    vals = torch.tensor([100.0, -100.0, 1e4, -1e4, 0.0, 20.0, -20.0, 3.0, -3.0, 0.5])
    g = torch.Generator().manual_seed(seed)
    gx = vals[torch.randint(0, len(vals), (1, n, 4 * hidden), generator=g)]
    c0 = randn((n, hidden), torch.float32, seed + 1) * 3
    return gx, torch.zeros(16, 8, 8), torch.zeros(n, hidden), c0          # W = 0: pre-activations are gx


def test_float32_cell_extreme_preactivations(monkeypatch):
    gx, w, h0, c0 = cell_case()
    assert set(gx.unique().tolist()) >= {100.0, -100.0, 1e4, -1e4, 0.0}
    kernels, run = [], lstm_cell.run
    monkeypatch.setattr(lstm_cell, "run", lambda name, *a: (kernels.append(name), run(name, *a))[1])
    _, (h, c) = block_sparse_lstm(gx, w, layouts.dense(2, 8), h0, c0)
    assert kernels == ["cell_forward"]                          # the numba float32 cell ran
    assert torch.isfinite(h).all() and torch.isfinite(c).all()
    _, h_ref, c_ref = ref_lstm(gx.double(), torch.zeros(16, 64, dtype=F64), h0.double(), c0.double())
    assert (h.double() - h_ref).abs().max() < 1e-6
    assert ((c.double() - c_ref).abs() / c_ref.abs().clamp(min=1)).max() < 1e-6
    gx[0, 1, 3] = float("nan")                                 # the float64 (torch) cell propagates NaN
    _, (h64, _) = block_sparse_lstm(gx.double(), w.double(), layouts.dense(2, 8), h0.double(), c0.double())
    assert torch.isnan(h64[1, 3]) and torch.isfinite(h64[0]).all()


@pytest.mark.parametrize("gate", range(4), ids=["i", "f", "g", "o"])
def test_float32_cell_propagates_nan(gate):
    gx, w, h0, c0 = cell_case(1)
    gx[0, 1, gate * 16 + 3] = float("nan")
    _, (h, c) = block_sparse_lstm(gx, w, layouts.dense(2, 8), h0, c0)
    assert torch.isnan(h[1, 3]), f"h = {h[1, 3].item()} from a NaN {'ifgo'[gate]} gate"
    assert torch.isfinite(h[0]).all() and torch.isfinite(h[2:]).all()
