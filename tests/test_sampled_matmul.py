"""sampled_matmul against a float64 dense reference: ``y[n, k] = (x @ w)[n, aB:(a+1)B]``
with ``a = active[n, k]``; forward, dx and dw for both weight orders ("cols": the
transpose of a contiguous (K, C) tensor, "rows": (C, K) contiguous) and other strides,
gradcheck, autograd plumbing, bad inputs, and the CUDA simulator (tiny sizes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_close, raises, randn  # helpers sets NUMBA_ENABLE_CUDASIM first

import numbasparse.kernels.cpu.sampled as cpu_sampled  # noqa: E402
from numbasparse.backend import simulate_cuda  # noqa: E402
from numbasparse.functional import sampled_matmul  # noqa: E402

DTYPES = (torch.float32, torch.float64)
NB = 5                                   # column blocks of w in the main cases


def _weight(kind, C, K, dtype, seed):
    """A leaf tensor and ``view`` with ``view(leaf)`` the (C, K) weight handed to sampled_matmul."""
    if kind == "cols":          # nn.Linear.weight.t()
        return randn((K, C), dtype, seed, True), lambda t: t.t()
    if kind == "rows":          # (C, K) contiguous
        return randn((C, K), dtype, seed, True), lambda t: t
    if kind == "sliced":        # rows of stride K + 8
        return randn((C, K + 8), dtype, seed, True), lambda t: t[:, :K]
    if kind == "sliced_t":      # strides (1, C + 3): a transpose, but not of a contiguous (K, C)
        return randn((K, C + 3), dtype, seed, True), lambda t: t[:, 1:C + 1].t()
    if kind == "cols_offset":   # transpose of a contiguous (K, C) slice at a storage offset
        return randn((K + 16, C), dtype, seed, True), lambda t: t[8:K + 8].t()
    if kind == "rows_offset":   # contiguous (C, K) slice at a storage offset
        return randn((C + 2, K), dtype, seed, True), lambda t: t[2:C + 2]
    if kind == "step":          # column stride 2
        return randn((C, 2 * K), dtype, seed, True), lambda t: t[:, ::2]
    raise AssertionError(kind)


def _active(pattern, N, A, nb, seed):
    rng = np.random.default_rng(seed)
    if pattern == "random":     # repeats within rows and across rows; block nb - 1 never used
        a = rng.integers(0, nb - 1, size=(N, A))
        a[0, :] = a[0, 0]       # row 0 repeats one id
    elif pattern == "same":     # every row picks block 2 (A times)
        a = np.full((N, A), 2)
    elif pattern == "skip":     # only blocks 0 and 3 (1, 2 and 4 unused)
        a = rng.choice([0, 3], size=(N, A))
    else:
        raise AssertionError(pattern)
    return torch.as_tensor(a, dtype=torch.int64)


def _reference(x, leaf, view, active, B, dy):
    """float64 ``y`` and the gradients of ``x`` and of the weight's leaf."""
    x64 = x.detach().double().requires_grad_(True)
    leaf64 = leaf.detach().double().requires_grad_(True)
    full = (x64 @ view(leaf64)).view(x.shape[0], -1, B)
    y = full[torch.arange(x.shape[0])[:, None], active]
    dx, dl = torch.autograd.grad(y, (x64, leaf64), dy.double())
    return y.detach(), dx, dl


def _check_case(kind, dtype, B, C, N, A, pattern, seed):
    K = NB * B
    x = randn((N, C), dtype, seed, True)
    leaf, view = _weight(kind, C, K, dtype, seed + 1)
    active = _active(pattern, N, A, NB, seed + 2)
    y = sampled_matmul(x, view(leaf), active, B)
    assert y.shape == (N, A, B) and y.dtype == dtype
    dy = randn((N, A, B), dtype, seed + 3)
    y.backward(dy)
    y_ref, dx_ref, dl_ref = _reference(x, leaf, view, active, B, dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(x.grad, dx_ref, dtype, "dx")
    assert_close(leaf.grad, dl_ref, dtype, "dw")
    dw = view(leaf.grad)                   # (C, K) gradient seen through the weight view
    unused = sorted(set(range(NB)) - set(active.flatten().tolist()))
    assert unused, "the case must leave blocks unused"
    for b in unused:
        assert torch.all(dw[:, b * B:(b + 1) * B] == 0), f"dw of unused block {b} is not exactly zero"
    if kind not in ("cols", "rows"):   # leaf entries outside the view get no gradient
        mask = torch.ones_like(leaf.grad, dtype=torch.bool)
        view(mask).fill_(False)
        assert torch.all(leaf.grad[mask] == 0)


@pytest.mark.parametrize("pattern,A", [("random", 3), ("random", 1), ("same", 1), ("same", 3), ("skip", 4)])
@pytest.mark.parametrize("N", [1, 7])
@pytest.mark.parametrize("B,C", [(8, 13), (16, 37), (32, 13)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["cols", "rows"])
def test_matches_dense_reference(kind, dtype, B, C, N, pattern, A):
    seed = B + 3 * C + 17 * N + 101 * A + (0 if dtype == torch.float32 else 7) + len(pattern)
    _check_case(kind, dtype, B, C, N, A, pattern, seed)


@pytest.mark.parametrize("kind", ["sliced", "sliced_t", "step", "cols_offset", "rows_offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_other_strides_fall_back(kind, dtype):
    _check_case(kind, dtype, 8, 13, 7, 3, "random", seed=40)


def _orders(monkeypatch):
    """Record (kind, order) of every CPU kernel call."""
    calls = []
    original = cpu_sampled.run

    def spy(kind, order, *args):
        calls.append((kind, order))
        return original(kind, order, *args)

    original_both = cpu_sampled.run_backward

    def spy_both(*args):
        calls.append(("data+weight", "cols"))
        return original_both(*args)

    monkeypatch.setattr(cpu_sampled, "run", spy)
    monkeypatch.setattr(cpu_sampled, "run_backward", spy_both)
    return calls


@pytest.mark.parametrize("kind,order", [("cols", "cols"), ("rows", "rows"), ("sliced", "rows"),
                                        ("sliced_t", "rows"), ("step", "rows"), ("cols_offset", "cols"),
                                        ("rows_offset", "rows")])
def test_weight_order_chosen(monkeypatch, kind, order):
    calls = _orders(monkeypatch)
    leaf, view = _weight(kind, 13, 16, torch.float32, 1)
    x = randn((3, 13), torch.float32, 2, True)
    sampled_matmul(x, view(leaf), torch.tensor([[0], [1], [0]]), 8).sum().backward()
    backward = [("data+weight", "cols")] if order == "cols" else [("data", order), ("weight", order)]
    assert calls == [("forward", order), *backward]      # cols: both gradients in one sweep


def test_threads_do_not_change_the_result(monkeypatch):
    """Several threads (forced: these sizes run serially by default) give the serial result
    bit for bit, and the reference."""
    import numbasparse.kernels.cpu.runtime as runtime

    rng = np.random.default_rng(30)
    active = torch.as_tensor(rng.integers(0, 15, size=(16, 6)))     # block 15 unused
    x = randn((16, 64), torch.float32, 31)
    W = randn((512, 64), torch.float32, 32)
    dy = randn((16, 6, 32), torch.float32, 33)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(runtime, "threads_for", lambda *a, **k: threads)
        xs, Ws = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        y = sampled_matmul(xs, Ws.t(), active, 32)
        y.backward(dy)
        results.append((y.detach(), xs.grad, Ws.grad))
    for serial, threaded in zip(*results):
        assert torch.equal(serial, threaded)
    y_ref, dx_ref, dW_ref = _reference(x, W, lambda t: t.t(), active, 32, dy)
    for got, ref, what in zip(results[1], (y_ref, dx_ref, dW_ref), ("y", "dx", "dW")):
        assert_close(got, ref, torch.float32, what)
    assert torch.all(results[1][2][15 * 32:] == 0)


def test_noncontiguous_x_and_expanded_dy():
    leaf = randn((7, 27), torch.float64, 3, True)
    W = randn((16, 13), torch.float64, 4, True)
    active = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1], [0, 0]])
    x = leaf[:, 1::2]
    sampled_matmul(x, W.t(), active, 8).sum().backward()     # dy: an expanded (stride 0) tensor
    _, dx, dW = _reference(x, W, lambda t: t.t(), active, 8, torch.ones(7, 2, 8))
    assert_close(leaf.grad[:, 1::2], dx, torch.float64, "dx")
    assert torch.all(leaf.grad[:, 0::2] == 0)
    assert_close(W.grad, dW, torch.float64, "dW")


@pytest.mark.parametrize("kind", ["cols", "rows"])
def test_gradcheck(kind):
    leaf, view = _weight(kind, 5, 24, torch.float64, 11)
    x = randn((3, 5), torch.float64, 12, True)
    active = torch.tensor([[2, 2], [0, 2], [2, 0]])          # block 1 unused, repeats
    assert torch.autograd.gradcheck(lambda a, b: sampled_matmul(a, view(b), active, 8), (x, leaf))


def test_empty_rows_and_active():
    W = randn((16, 13), torch.float32, 1, True)
    for shape in [(0, 2), (3, 0)]:
        x = randn((shape[0], 13), torch.float32, 2, True)
        y = sampled_matmul(x, W.t(), torch.zeros(shape, dtype=torch.int64), 8)
        assert y.shape == (*shape, 8)
        y.sum().backward()
        assert torch.all(x.grad == 0) and x.grad.shape == x.shape
        assert torch.all(W.grad == 0)


# ------------------------------------------------------------------ autograd plumbing
def test_no_graph_without_grad():
    x, w = randn((3, 13), torch.float32, 1), randn((13, 16), torch.float32, 2)
    active = torch.tensor([[1], [0], [1]])
    y = sampled_matmul(x, w, active, 8)
    assert y.grad_fn is None and not y.requires_grad
    assert_close(y, (x.double() @ w.double()).view(3, 2, 8)[torch.arange(3)[:, None], active],
                 torch.float32, "y")
    with torch.no_grad():
        y = sampled_matmul(x.requires_grad_(), w.requires_grad_(), active, 8)
    assert y.grad_fn is None and not y.requires_grad


@pytest.mark.parametrize("which", ["x", "w"])
@pytest.mark.parametrize("kind", ["cols", "rows"])
def test_only_one_input_requires_grad(monkeypatch, which, kind):
    calls = _orders(monkeypatch)
    leaf, view = _weight(kind, 13, 24, torch.float64, 5)
    x = randn((4, 13), torch.float64, 6, which == "x")
    leaf.requires_grad_(which == "w")
    active = torch.tensor([[2, 0], [0, 0], [2, 2], [0, 2]])
    y = sampled_matmul(x, view(leaf), active, 8)
    assert y.requires_grad
    dy = randn((4, 2, 8), torch.float64, 7)
    y.backward(dy)
    _, dx_ref, dl_ref = _reference(x, leaf, view, active, 8, dy)
    if which == "x":
        assert leaf.grad is None
        assert_close(x.grad, dx_ref, torch.float64, "dx")
    else:
        assert x.grad is None
        assert_close(leaf.grad, dl_ref, torch.float64, "dw")
    assert [k for k, _ in calls] == ["forward", "data" if which == "x" else "weight"]


@pytest.mark.parametrize("kind", ["cols", "rows"])
def test_nan_in_unused_block_does_not_leak(kind):
    leaf, view = _weight(kind, 13, 24, torch.float32, 8)
    with torch.no_grad():
        view(leaf)[:, 8:16] = float("nan")              # block 1: never chosen
    x = randn((5, 13), torch.float32, 9, True)
    active = torch.tensor([[0, 2], [2, 2], [0, 0], [2, 0], [0, 2]])
    y = sampled_matmul(x, view(leaf), active, 8)
    dy = randn((5, 2, 8), torch.float32, 10)
    y.backward(dy)
    clean = leaf.detach().nan_to_num(0.0)
    y_ref, dx_ref, dl_ref = _reference(x, clean, view, active, 8, dy)
    assert_close(y, y_ref, torch.float32, "y")          # also asserts everything finite
    assert_close(x.grad, dx_ref, torch.float32, "dx")
    assert_close(leaf.grad, dl_ref, torch.float32, "dw")


# ------------------------------------------------------------------ bad inputs
def _ok():
    return randn((3, 13), torch.float32, 1), randn((13, 24), torch.float32, 2), torch.tensor([[0], [1], [2]])


@pytest.mark.parametrize("active,exc,match", [
    (torch.tensor([[0], [-1], [2]]), ValueError, r"ids must lie in \[0, 3\)"),
    (torch.tensor([[0], [3], [2]]), ValueError, r"ids must lie in \[0, 3\)"),
    (torch.tensor([[0.0], [1.0], [2.0]]), TypeError, "integer block ids"),
    (torch.tensor([[True], [False], [True]]), TypeError, "integer block ids"),
    (torch.tensor([0, 1, 2]), ValueError, r"shape \(N, A\) = \(3, A\)"),
    (torch.tensor([[0], [1]]), ValueError, r"shape \(N, A\) = \(3, A\)"),
    ([[0], [1], [2]], TypeError, "active must be a torch.Tensor"),
])
def test_bad_active(active, exc, match):
    x, w, _ = _ok()
    raises(exc, match, sampled_matmul, x, w, active, 8)


def test_int32_and_uint8_active_accepted():
    x, w, active = _ok()
    ref = sampled_matmul(x, w, active, 8)
    for dtype in (torch.int32, torch.uint8):
        assert torch.equal(sampled_matmul(x, w, active.to(dtype), 8), ref)


@pytest.mark.skip(reason="active on another device needs a GPU; CPU-only here")
def test_active_on_other_device():
    pass


def test_bad_x_and_w():
    x, w, active = _ok()
    raises(TypeError, "use one dtype", sampled_matmul, x, w.double(), active, 8)
    raises(TypeError, "supports float32 and float64", sampled_matmul, x.half(), w.half(), active, 8)
    raises(TypeError, "supports float32 and float64", sampled_matmul, x, w.half(), active, 8)
    raises(ValueError, "x must be 2-D", sampled_matmul, x[None], w, active, 8)
    raises(ValueError, "w must be 2-D", sampled_matmul, x, w[None], active, 8)
    raises(ValueError, "x has 12 features but w has 13 rows", sampled_matmul, x[:, :12], w, active, 8)
    raises(ValueError, "20 columns, not a multiple of block_size 8", sampled_matmul, x, w[:, :20], active, 8)
    raises(ValueError, "24 columns, not a multiple of block_size 16", sampled_matmul, x, w, active, 16)
    for bad in (4, 12, 0, 8.0, True, "8", None):
        raises(ValueError, "block_size must be one of", sampled_matmul, x, w, active, bad)
    raises(TypeError, "x must be a torch.Tensor", sampled_matmul, x.numpy(), w, active, 8)
    raises(TypeError, "w must be a torch.Tensor", sampled_matmul, x, w.tolist(), active, 8)


# ------------------------------------------------------------------ CUDA simulator
simulator = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="real GPU present: the simulator is off")


@simulator
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["cols", "rows"])
def test_simulated_cuda_matches_cpu(monkeypatch, kind, dtype):
    import numbasparse.kernels.cuda.sampled as cuda_sampled

    launches = []
    original = cuda_sampled.launch
    monkeypatch.setattr(cuda_sampled, "launch", lambda *a, **k: (launches.append(a[:2]), original(*a, **k))[1])
    active = torch.tensor([[3, 0], [0, 0], [3, 1]])          # block 2 unused, repeats
    x = randn((3, 13), dtype, 21)
    leaf, view = _weight(kind, 13, 32, dtype, 22)
    dy = randn((3, 2, 8), dtype, 23)
    results = []
    for simulate in (False, True):
        xs, ls = x.clone().requires_grad_(True), leaf.detach().clone().requires_grad_(True)
        with simulate_cuda(simulate):
            y = sampled_matmul(xs, view(ls), active, 8)
            y.backward(dy)
        results.append((y.detach(), xs.grad, ls.grad))
    assert launches == [("forward", kind), ("data", kind), ("weight", kind)]
    (y0, dx0, dl0), (y1, dx1, dl1) = results
    y_ref, dx_ref, dl_ref = _reference(x, leaf, view, active, 8, dy)
    for got, cpu, ref, what in [(y1, y0, y_ref, "y"), (dx1, dx0, dx_ref, "dx"), (dl1, dl0, dl_ref, "dw")]:
        assert_close(got, cpu, dtype, what + " simulator vs cpu")
        assert_close(got, ref, dtype, what + " simulator vs reference")
    assert torch.all(view(dl1)[:, 16:24] == 0)
