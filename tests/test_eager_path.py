"""The eager fast path (numbasparse.eager): taken only for plain eager calls, and equal
to the bit to the registered operators in values and gradients."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from numbasparse import eager, ops
from numbasparse.conv import conv2d_op, conv_geometry
from numbasparse.functional import matmul_op
from numbasparse.layout_tensor import layout_tensor

from test_torch_native import B, KINDS, _input, _layer, _layout


def _calls(monkeypatch):
    """Count calls into the fast path's autograd Functions and no-grad branches."""
    seen = []
    for name in ("matmul", "conv2d"):
        original = getattr(eager, name)
        monkeypatch.setattr(eager, name, lambda *a, _f=original, _n=name: (seen.append(_n), _f(*a))[1])
    return seen


def test_plain_eager_calls_take_the_fast_path(monkeypatch):
    seen = _calls(monkeypatch)
    for kind in KINDS:
        layer = _layer(kind)
        layer(_input(kind)).sum().backward()
        with torch.no_grad():
            layer(_input(kind))
    assert seen.count("matmul") == 4 and seen.count("conv2d") == 4


@pytest.mark.parametrize("context", ["autocast", "device_mode", "fake", "vmap", "meta"])
def test_the_operators_run_whenever_something_watches(context, monkeypatch):
    seen = _calls(monkeypatch)
    x = torch.randn(3, 4 * B)
    w = torch.randn(3, 4 * B, B)
    assert eager.eager_allowed(x, w)
    if context == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not eager.eager_allowed(x, w)
            _layer("linear")(x)
    elif context == "device_mode":
        with torch.device("cpu"):
            assert not eager.eager_allowed(x, w)
            _layer("linear")(x)
    elif context == "fake":
        layer = _layer("linear")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx = mode.from_tensor(x)
            assert not eager.eager_allowed(fx, w)
            assert layer(fx).shape == (3, 4 * B)
    elif context == "vmap":
        layer = _layer("linear")
        torch.func.vmap(lambda row: layer(row.unsqueeze(0)).squeeze(0))(x)
    else:
        layer = _layer("linear").to("meta")
        assert not eager.eager_allowed(x.to("meta"), w.to("meta"))
        assert layer(x.to("meta")).shape == (3, 4 * B)
    assert seen == []


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_equals_the_operators_to_the_bit(kind, monkeypatch):
    layer = _layer(kind, dtype=torch.float64)
    x = _input(kind, dtype=torch.float64).requires_grad_()

    def run():
        torch.manual_seed(3)
        for m in layer.modules():
            if hasattr(m, "noise_counter"):
                m.noise_counter.zero_()
        y = layer(x)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
        grads = torch.autograd.grad(y, [x] + [p for p in layer.parameters()], dy)
        return [y.detach()] + list(grads)

    fast = run()
    monkeypatch.setattr(eager, "eager_allowed", lambda *a: False)
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_double_backward_through_the_fast_path_raises():
    layer = _layer("linear")
    x = torch.randn(3, 4 * B, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


def test_functional_ops_give_the_same_results_on_both_paths():
    layout = _layout()
    lt = layout_tensor(layout, "cpu")
    x = torch.randn(2, 4 * B, dtype=torch.float64)
    w = torch.randn(layout.capacity, B, B, dtype=torch.float64)
    bias = torch.randn(4 * B, dtype=torch.float64)
    assert torch.equal(matmul_op(x, w, bias, lt, B, 4 * B), ops.matmul(x, w, bias, lt, B, 4 * B))
    xc = torch.randn(2, 4 * B, 5, 5, dtype=torch.float64)
    wc = torch.randn(layout.capacity, 3, 3, B, B, dtype=torch.float64)
    geometry = conv_geometry((5, 5), (3, 3), 1, 1, 1)
    assert torch.equal(conv2d_op(xc, wc, lt, B, 4 * B, geometry),
                       ops.conv2d(xc, wc, lt, B, 4 * B, [1, 1], [1, 1, 1, 1], [1, 1]))
