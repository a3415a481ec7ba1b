"""The layers as PyTorch sees them: torch.compile (fullgraph, before any eager call, no
graph breaks), layout changes between compiled calls, torch.export, autocast and
torch.func over the operators registered as ``torch.ops.numbasparse.*``."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
import numbasparse
from numbasparse import BlockLayout, BlockSparseConv2d, BlockSparseLinear
from numbasparse.layout_tensor import layout_tensor

B = 8
KINDS = ["linear", "conv", "l0_linear", "l0_conv"]


def _layout():
    mask = np.random.default_rng(0).random((4, 4)) < 0.6
    mask[0] = False                                   # an empty block row
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    return BlockLayout(mask, capacity=int(mask.sum()) + 2)


def _layer(kind, dtype=torch.float32):
    torch.manual_seed(0)
    layout = _layout()
    if kind == "linear":
        return BlockSparseLinear(4 * B, 4 * B, layout, block_size=B, dtype=dtype)
    if kind == "conv":
        return BlockSparseConv2d(4 * B, 4 * B, 3, layout, block_size=B, padding=1, dtype=dtype)
    if kind == "l0_linear":
        return learn.L0BlockSparseLinear(4 * B, 4 * B, layout, block_size=B, seed=1, dtype=dtype)
    return learn.L0BlockSparseConv2d(4 * B, 4 * B, 3, layout, block_size=B, padding=1, seed=1, dtype=dtype)


def _input(kind, batch=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    shape = (batch, 4 * B, 5, 6) if kind.endswith("conv") else (batch, 4 * B)
    return torch.randn(shape, generator=g, dtype=dtype)


def _counters(module):
    return [m.noise_counter.clone() for m in module.modules() if isinstance(m, learn.HardConcreteGate)]


def _restore(module, counters):
    for m, c in zip((m for m in module.modules() if isinstance(m, learn.HardConcreteGate)), counters):
        m.noise_counter.copy_(c)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_before_any_eager_call(kind, mode):
    torch._dynamo.reset()
    layer = _layer(kind, torch.float64).train(mode == "train")
    x = _input(kind, dtype=torch.float64).requires_grad_()
    counters = _counters(layer)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)                                   # the first call of the layer at all
    y.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    _restore(layer, counters)                         # the same gate noise, eagerly
    x.grad = None
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x.detach())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("kind", ["linear", "l0_linear", "conv"])
def test_layout_change_between_compiled_calls_is_seen(kind):
    torch._dynamo.reset()
    layer = _layer(kind).eval()
    x = _input(kind)
    compiled = torch.compile(layer, fullgraph=True)
    before = compiled(x)
    layout = layer.layout
    rows, cols = layout.entry_rows[:2], layout.entry_cols[:2]
    layer.set_layout(layout.remove(rows, cols))
    after = compiled(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, layer(x))
    layer.set_layout(layout)
    torch.testing.assert_close(compiled(x), before)


def test_dynamic_sparsity_updates_a_compiled_model():
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = nn.Sequential(learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B, seed=1), nn.ReLU(),
                          learn.L0BlockSparseLinear(4 * B, B, block_size=B, seed=2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    controller = learn.DynamicSparsity(model, optimizer, every=2, threshold=0.5)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        model[0].gate.log_alpha[:5] = -6.0
    x, target = torch.randn(16, 4 * B), torch.randn(16, B)
    for _ in range(4):
        loss = F.mse_loss(compiled(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()
    assert model[0].layout.nnz == 11
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = BlockSparseConv2d(2 * B, 4 * B, 3, np.ones((2, 4), dtype=bool), block_size=B, padding=1)
        self.gated_conv = learn.L0BlockSparseConv2d(4 * B, 4 * B, 3, _layout(), block_size=B, padding=1, seed=4)
        self.linear = BlockSparseLinear(4 * B, 4 * B, _layout(), block_size=B)
        self.gated = learn.L0BlockSparseLinear(4 * B, 2 * B, block_size=B, seed=5)

    def forward(self, x):
        h = F.relu(self.gated_conv(F.relu(self.conv(x)))).mean(dim=(2, 3))
        return self.gated(F.relu(self.linear(h)))


def test_export_and_run_the_exported_program():
    net = _Net().eval()
    x = torch.randn(2, 2 * B, 6, 6)
    exported = torch.export.export(net, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "numbasparse.matmul.default" in ops and "numbasparse.conv2d.default" in ops
    torch.testing.assert_close(exported.module()(x), net(x))
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}})
    x5 = torch.randn(5, 2 * B, 6, 6)
    torch.testing.assert_close(dynamic.module()(x5), net(x5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_autocast_computes_in_the_autocast_dtype_as_nn_linear_does(kind, dtype):
    layer = _layer(kind).train()
    x = _input(kind)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        y_half_input = layer(x.to(dtype))
    assert y.dtype == dtype and y_half_input.dtype == dtype
    reference = copy.deepcopy(layer).eval().to(dtype)   # the same computation, in 16-bit modules
    layer.eval()
    with torch.autocast("cpu", dtype=dtype):
        y_eval = layer(x)
    # gated layers round w * z once under autocast, and w then w * z in a 16-bit module
    tolerance = {} if not kind.startswith("l0") else dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 \
        else dict(rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(y_eval, reference(x.to(dtype)), **tolerance)
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32   # the cast's backward: float32 gradients
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_autocast_rule_is_on_the_operator_and_leaves_float64_alone():
    layer = _layer("linear")
    x = _input("linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.numbasparse.matmul(x, layer.weight, layer.bias, layer.kernel_layout, B, 4 * B)
        wide = torch.ops.numbasparse.matmul(x.double(), layer.weight.double(), None, layer.kernel_layout, B, 4 * B)
    assert out.dtype == torch.bfloat16 and wide.dtype == torch.float64
    expected = torch.ops.numbasparse.matmul(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(),
                                            layer.kernel_layout, B, 4 * B)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_torch_func_grad_and_vmap_over_the_functional_api():
    layout = _layout()
    w = torch.randn(layout.capacity, B, B, dtype=torch.float64)
    x = torch.randn(3, 4 * B, dtype=torch.float64)

    def loss(w, x):
        return numbasparse.block_sparse_matmul(x, w, layout, B).square().sum()

    grad_w = torch.func.grad(loss)(w, x)
    w_ref = w.clone().requires_grad_()
    loss(w_ref, x).backward()
    torch.testing.assert_close(grad_w, w_ref.grad)

    xs = torch.randn(4, 3, 4 * B, dtype=torch.float64)
    mapped = torch.func.vmap(lambda xx: numbasparse.block_sparse_matmul(xx, w, layout, B))(xs)
    torch.testing.assert_close(mapped, torch.stack([numbasparse.block_sparse_matmul(xx, w, layout, B) for xx in xs]))

    with pytest.raises(NotImplementedError, match="vmap over the gradient of numbasparse.matmul"):
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
    with pytest.raises(NotImplementedError, match="vmap over the weight"):
        torch.func.vmap(lambda ww: numbasparse.block_sparse_matmul(x, ww, layout, B))(w.expand(2, -1, -1, -1))


def test_conv_under_torch_func_grad():
    layout = _layout()
    w = torch.randn(layout.capacity, 3, 3, B, B, dtype=torch.float64)
    x = torch.randn(2, 4 * B, 5, 5, dtype=torch.float64)

    def loss(w):
        return numbasparse.block_sparse_conv2d(x, w, layout, B, padding=1).square().sum()

    w_ref = w.clone().requires_grad_()
    loss(w_ref).backward()
    torch.testing.assert_close(torch.func.grad(loss)(w), w_ref.grad)


def test_operators_are_registered():
    for name in ("matmul", "matmul_backward", "conv2d", "conv2d_backward"):
        assert hasattr(torch.ops.numbasparse, name)
    layout = _layout()
    fake = torch.empty(7, 4 * B, device="meta")
    y = torch.ops.numbasparse.matmul(fake, torch.empty(layout.capacity, B, B, device="meta"), None,
                                     layout_tensor(layout, "meta"), B, 4 * B)
    assert y.shape == (7, 4 * B) and y.device.type == "meta"
