"""BlockSparseLSTM and functional.block_sparse_lstm: equivalence with nn.LSTM, sparse
layouts against a float64 masked reference written here, gradients (gradcheck on the
eager path and through torch.ops.numbasparse.lstm) and layout changes.  Errors, 16-bit,
compile, checkpoints and the cell kernel's edge values: test_lstm_edges.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from numbasparse import BlockSparseLSTM, layouts, lstm_ops
from numbasparse.functional import block_sparse_lstm
from numbasparse.layout_tensor import layout_tensor
from numbasparse.nn import blocks_to_dense

from helpers import dense_reference, mask_with_empty, permuted_layout, randn

F64 = torch.float64


def ref_lstm(gx, W, h0, c0):
    """float64-able reference recurrence: gx (T, N, 4H) and dense W (H, 4H), gates [i|f|g|o]."""
    hidden = W.shape[0]
    h, c, outs = h0, c0, []
    for t in range(gx.shape[0]):
        i, f, g, o = (gx[t] + h @ W).split(hidden, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def close(a, b, tol, what=""):
    torch.testing.assert_close(a.detach().to(F64), b.detach().to(F64), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def states(n, hidden, dtype, seed, lead=(1,)):
    return tuple(randn((*lead, n, hidden) if n else (*lead, hidden), dtype, seed + k, requires_grad=True)
                 for k in range(2))


# ------------------------------------------------------------------ nn.LSTM equivalence
CASES = [(8, 3, 13, 1, 5), (16, 2, 13, 3, 1), (32, 2, 7, 2, 4)]   # B, hidden blocks, input, N, T


@pytest.mark.parametrize("given_state", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tnf", "ntf"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("B,blocks,features,N,T", CASES)
def test_from_dense_matches_nn_lstm(B, blocks, features, N, T, dtype, tol, batch_first, given_state):
    torch.manual_seed(B + T)
    H = B * blocks
    ref = nn.LSTM(features, H, batch_first=batch_first, dtype=dtype)
    m = BlockSparseLSTM.from_dense(ref, block_size=B)
    assert m.layout == layouts.dense(blocks, 4 * blocks) and m.batch_first == batch_first
    x = randn((N, T, features) if batch_first else (T, N, features), dtype, 1, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    hx = states(N, H, dtype, 2) if given_state else None
    hx_ref = tuple(s.detach().clone().requires_grad_(True) for s in hx) if given_state else None
    y, (h, c) = m(x, hx)
    y_ref, (h_ref, c_ref) = ref(x_ref, hx_ref)
    assert y.shape == y_ref.shape and h.shape == (1, N, H) and c.shape == (1, N, H)
    for a, b, what in ((y, y_ref, "output"), (h, h_ref, "h_n"), (c, c_ref, "c_n")):
        close(a, b, tol, what)
    dy, dh, dc = (randn(tuple(t.shape), dtype, 10 + k) for k, t in enumerate((y, h, c)))
    ((y * dy).sum() + (h * dh).sum() + (c * dc).sum()).backward()
    ((y_ref * dy).sum() + (h_ref * dh).sum() + (c_ref * dc).sum()).backward()
    pairs = [("d input", x.grad, x_ref.grad),
             ("d weight_hh", blocks_to_dense(m.recurrent.weight.grad, m.layout, B).t(), ref.weight_hh_l0.grad),
             ("d weight_ih", m.input_projection.weight.grad, ref.weight_ih_l0.grad),
             ("d bias_ih", m.bias.grad, ref.bias_ih_l0.grad), ("d bias_hh", m.bias.grad, ref.bias_hh_l0.grad)]
    pairs += [(f"d state {k}", hx[k].grad, hx_ref[k].grad) for k in range(2)] if given_state else []
    for what, a, b in pairs:
        close(a, b, tol, what)


def test_from_dense_without_bias_and_unbatched_input():
    torch.manual_seed(3)
    ref = nn.LSTM(13, 16, bias=False, dtype=F64)
    m = BlockSparseLSTM.from_dense(ref, block_size=8)
    assert m.bias is None
    x = randn((4, 13), F64, 1, requires_grad=True)                       # unbatched (T, features)
    hx = states(0, 16, F64, 2)
    y, (h, c) = m(x, hx)
    y_ref, (h_ref, c_ref) = ref(x, hx)
    assert y.shape == (4, 16) and h.shape == (1, 16) and c.shape == (1, 16)
    for a, b in ((y, y_ref), (h, h_ref), (c, c_ref)):
        close(a, b, 1e-10)
    grads = torch.autograd.grad((y.sum() + h.sum() + 2 * c.sum()), (x, *hx))
    grads_ref = torch.autograd.grad((y_ref.sum() + h_ref.sum() + 2 * c_ref.sum()), (x, *hx))
    for a, b in zip(grads, grads_ref):
        close(a, b, 1e-10)
    y0, (h0, _) = m(x)                                                    # zero states, unbatched
    close(y0, ref(x)[0], 1e-10)
    assert h0.shape == (1, 16)


# ------------------------------------------------------------------ sparse layouts
def sparse_module(input_layout, dtype, seed=0):
    """H = 24 (3 blocks of 8): recurrent block row 1 empty, the forget gate's columns 3..5
    empty; slots permuted with free slots; free slots (recurrent and input) hold NaN."""
    B = 8
    mask = np.random.default_rng(seed).random((3, 12)) < 0.6
    mask[[0, 2], [0, 6]] = True
    mask[1, :] = False
    mask[:, 3:6] = False
    layout, slots, _ = permuted_layout(mask, extra=3, seed=seed + 1)
    in_mask = in_slots = None
    if not input_layout:
        input_layout = None
    else:
        in_mask = mask_with_empty(2, 12, None, 7, seed=seed + 2)
        input_layout, in_slots, _ = permuted_layout(in_mask, extra=2, seed=seed + 3)
    torch.manual_seed(seed)
    m = BlockSparseLSTM(16, 24, layout, block_size=B, input_layout=input_layout, dtype=dtype)
    with torch.no_grad():
        m.recurrent.weight.mul_(3)                                   # make the recurrence matter
        m.recurrent.weight[torch.as_tensor(layout.free_slots())] = float("nan")
        if in_mask is not None:
            m.input_projection.weight[torch.as_tensor(m.input_projection.layout.free_slots())] = float("nan")
    return m, (mask, slots), (in_mask, in_slots)


def module_reference(m, rec, inp, x, hx, dy):
    """Float64 outputs and gradients (w.r.t. x, the weights, bias) by the masked dense reference."""
    w = m.recurrent.weight.detach().to(F64).requires_grad_(True)
    w_in = m.input_projection.weight.detach().to(F64).requires_grad_(True)
    bias = m.bias.detach().to(F64).requires_grad_(True)
    x64 = x.detach().to(F64).requires_grad_(True)
    W_in = w_in.t() if inp[0] is None else dense_reference(w_in, inp[0], inp[1], 8)
    gx = x64 @ W_in + bias
    y, h, c = ref_lstm(gx, dense_reference(w, rec[0], rec[1], 8), *(s.detach().to(F64)[0] for s in hx))
    grads = torch.autograd.grad((y * dy.to(F64)).sum() + h.sum() - c.sum(), (x64, w, w_in, bias))
    return (y, h, c), grads


@pytest.mark.parametrize("input_layout", [False, True], ids=["dense_in", "sparse_in"])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 2e-5)], ids=["f64", "f32"])
def test_sparse_layout_matches_masked_reference(input_layout, dtype, tol):
    m, rec, inp = sparse_module(input_layout, dtype)
    assert m.layout.capacity > m.layout.nnz and m.recurrent.weight.isnan().any()
    x = randn((6, 3, 16), dtype, 1, requires_grad=True)
    hx = states(3, 24, dtype, 2)
    y, (h, c) = m(x, hx)
    assert torch.isfinite(y).all() and torch.isfinite(c).all(), "a free slot's NaN leaked"
    dy = randn(tuple(y.shape), dtype, 3)
    ((y * dy).sum() + h.sum() - c.sum()).backward()
    (y_ref, h_ref, c_ref), grads = module_reference(m, rec, inp, x, hx, dy)
    close(y, y_ref, tol, "output")
    close(h[0], h_ref, tol, "h_n")
    close(c[0], c_ref, tol, "c_n")
    got = (x.grad, m.recurrent.weight.grad, m.input_projection.weight.grad, m.bias.grad)
    for what, a, b in zip(("dx", "d recurrent", "d input weight", "d bias"), got, grads):
        close(a, b, tol, what)                 # free slots: zero gradient on both sides
    assert torch.all(m.recurrent.weight.grad[torch.as_tensor(m.layout.free_slots())] == 0)


# ------------------------------------------------------------------ gradcheck, operator
def tiny_problem(seed=0):
    mask = np.ones((2, 8), dtype=bool)
    mask[1, 2] = mask[0, 5] = False
    layout, _, capacity = permuted_layout(mask, extra=2, seed=seed)
    gx = randn((3, 2, 64), F64, seed + 1, requires_grad=True)
    w = (0.5 * randn((capacity, 8, 8), F64, seed + 2)).requires_grad_(True)
    h0 = randn((2, 16), F64, seed + 3, requires_grad=True)
    c0 = randn((2, 16), F64, seed + 4, requires_grad=True)
    return layout, gx, w, h0, c0


def count_paths(monkeypatch):
    seen = []
    eager_apply, op = lstm_ops._EagerLstm.apply, lstm_ops.lstm
    monkeypatch.setattr(lstm_ops._EagerLstm, "apply", lambda *a: (seen.append("eager"), eager_apply(*a))[1])
    monkeypatch.setattr(lstm_ops, "lstm", lambda *a: (seen.append("operator"), op(*a))[1])
    return seen


@pytest.mark.parametrize("path", ["eager", "operator"])
def test_gradcheck_functional(path, monkeypatch):
    layout, gx, w, h0, c0 = tiny_problem()
    seen = count_paths(monkeypatch)

    def f(gx, w, h0, c0):
        out, (h, c) = block_sparse_lstm(gx, w, layout, h0, c0)
        return out, h, c

    if path == "eager":
        assert torch.autograd.gradcheck(f, (gx, w, h0, c0))
    else:
        with torch.device("cpu"):                      # a function mode: the registered operator runs
            assert torch.autograd.gradcheck(f, (gx, w, h0, c0))
    assert seen and set(seen) == {path}


def test_opcheck_operator():
    layout, gx, w, h0, c0 = tiny_problem(1)
    torch.library.opcheck(torch.ops.numbasparse.lstm.default, (gx, w, layout_tensor(layout), 8, h0, c0))
    hs, cs, gates = torch.ops.numbasparse.lstm(gx, w, layout_tensor(layout), 8, h0, c0)
    assert hs.shape == cs.shape == (4, 2, 16) and gates.shape == gx.shape and not gates.requires_grad
    assert torch.equal(hs[0], h0) and torch.equal(cs[0], c0)
    y_ref, h_ref, c_ref = ref_lstm(gx, dense_reference(w, layout.mask, layout.slots, 8), h0, c0)
    close(hs[1:], y_ref, 1e-12)
    close(cs[-1], c_ref, 1e-12)


@pytest.mark.parametrize("path", ["eager", "operator"])
@pytest.mark.parametrize("used", ["h_n", "c_n", "output[0]"])
def test_gradient_of_one_output_only(used, path, monkeypatch):
    layout, gx, w, h0, c0 = tiny_problem(2)
    seen = count_paths(monkeypatch)
    pick = {"h_n": lambda y, h, c: h, "c_n": lambda y, h, c: c, "output[0]": lambda y, h, c: y[0]}[used]
    with torch.device("cpu") if path == "operator" else torch.enable_grad():
        y, (h, c) = block_sparse_lstm(gx, w, layout, h0, c0)
    dout = randn(tuple(h.shape), F64, 9)
    grads = torch.autograd.grad((pick(y, h, c) * dout).sum(), (gx, w, h0, c0))
    y_ref, h_ref, c_ref = ref_lstm(gx, dense_reference(w, layout.mask, layout.slots, 8), h0, c0)
    grads_ref = torch.autograd.grad((pick(y_ref, h_ref, c_ref) * dout).sum(), (gx, w, h0, c0))
    for what, a, b in zip(("gx", "w", "h0", "c0"), grads, grads_ref):
        close(a, b, 1e-10, what)
    if used == "output[0]":
        assert torch.all(grads[0][1:] == 0)           # later steps do not feed output[0]
    assert seen == [path]


def test_no_graph_when_nothing_requires_grad():
    layout, gx, w, h0, c0 = tiny_problem(3)
    args = [t.detach() for t in (gx, w, h0, c0)]
    y, (h, c) = block_sparse_lstm(args[0], args[1], layout, args[2], args[3])
    assert not y.requires_grad and y.grad_fn is None and h.grad_fn is None and c.grad_fn is None
    with_grad = block_sparse_lstm(gx, w, layout, h0, c0)
    assert torch.equal(y, with_grad[0].detach()) and torch.equal(c, with_grad[1][1].detach())
    m, *_ = sparse_module(False, torch.float32)
    x = randn((4, 2, 16), torch.float32, 1)
    with torch.no_grad():
        out, (hn, _) = m(x)
    assert out.grad_fn is None and hn.grad_fn is None and torch.equal(out, m(x)[0].detach())


# ------------------------------------------------------------------ layout changes
def two_layouts():
    mask = np.random.default_rng(5).random((2, 8)) < 0.7
    mask[:, [1, 4]] = True
    first, slots, capacity = permuted_layout(mask, extra=4, seed=6)
    live = np.argwhere(mask)
    second = first.remove(*live[:2].T).add([0, 1], [np.flatnonzero(~mask[0])[0], np.flatnonzero(~mask[1])[0]])
    assert second.capacity == first.capacity and second != first
    return first, second


def full_module(layout, seed):
    torch.manual_seed(seed)
    m = BlockSparseLSTM(5, 16, layout, block_size=8, dtype=F64)
    with torch.no_grad():
        m.recurrent.weight.copy_(randn(tuple(m.recurrent.weight.shape), F64, seed))   # every slot non-zero
    return m


def test_layout_change_between_chunks():
    first, second = two_layouts()
    m = full_module(first, 1)
    x1, x2 = randn((3, 2, 5), F64, 3), randn((4, 2, 5), F64, 4)
    y1, hx = m(x1)
    m.recurrent.set_layout(second)
    y2, (h, c) = m(x2, hx)
    (y1.sum() + 2 * y2.sum() + c.sum()).backward()

    w = m.recurrent.weight.detach().clone().requires_grad_(True)
    project = lambda x: m.input_projection(x).detach()               # noqa: E731
    zeros = torch.zeros(2, 16, dtype=F64)
    r1, h1, c1 = ref_lstm(project(x1), dense_reference(w, first.mask, first.slots, 8), zeros, zeros)
    r2, h2, c2 = ref_lstm(project(x2), dense_reference(w, second.mask, second.slots, 8), h1, c1)
    close(y1, r1, 1e-10, "chunk 1")
    close(y2, r2, 1e-10, "chunk 2")
    close(c[0], c2, 1e-10, "c_n")
    dw, = torch.autograd.grad(r1.sum() + 2 * r2.sum() + c2.sum(), w)
    close(m.recurrent.weight.grad, dw, 1e-10, "weight gradient over both layouts")


def test_layout_swap_before_backward_keeps_forward_layout():
    first, second = two_layouts()
    m = full_module(first, 2)
    x = randn((4, 2, 5), F64, 6)
    y, (h, c) = m(x)
    m.recurrent.set_layout(second)                       # between forward and backward
    (y.sum() + c.sum()).backward()
    w = m.recurrent.weight.detach().clone().requires_grad_(True)
    zeros = torch.zeros(2, 16, dtype=F64)
    for layout, same in ((first, True), (second, False)):
        r, _, rc = ref_lstm(m.input_projection(x).detach(), dense_reference(w, layout.mask, layout.slots, 8), zeros, zeros)
        dw, = torch.autograd.grad(r.sum() + rc.sum(), w)
        assert torch.allclose(m.recurrent.weight.grad, dw, rtol=1e-10, atol=1e-10) == same


def test_in_place_weight_change_before_backward_raises():
    m, *_ = sparse_module(False, torch.float32, seed=4)
    y, _ = m(randn((3, 2, 16), torch.float32, 1))
    with torch.no_grad():
        m.recurrent.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
