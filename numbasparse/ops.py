"""The kernels as operators registered with PyTorch: ``torch.ops.numbasparse.*``.

Registered through ``torch.library`` with a fake (shape-only) implementation, an
autograd formula, autocast rules and vmap rules, so that ``torch.compile`` (with
``fullgraph=True``), ``torch.export``, autocast and ``torch.func`` treat them like
built-in operators: dynamo never traces numba or numpy code.  The layout travels as
an int32 tensor (:mod:`numbasparse.layout_tensor`).

Operators (x, w, dy: float32 / float64 / float16 / bfloat16, one dtype, contiguous; ``layout``: a layout tensor):

* ``matmul(x (N, C), w (capacity, B, B), bias (K,)?, layout, block_size, out_features)
  -> y (N, K)``
* ``matmul_backward(dy (N, K), x (N, C), w, layout, block_size, need_dx, need_dw)
  -> (dx (N, C), dw (capacity, B, B))``; a gradient not asked for is an empty tensor.
* ``conv2d(x (N, C, H, W), w (capacity, kh, kw, B, B), layout, block_size,
  out_channels, stride[2], padding[4], dilation[2]) -> y (N, K, Ho, Wo)`` with
  ``padding = (top, left, bottom, right)``.
* ``conv2d_backward(dy, x, w, layout, block_size, stride, padding, dilation, need_dx,
  need_dw) -> (dx, dw)``.

They check nothing: :mod:`numbasparse.functional` and the modules check the arguments
against the layout before calling them.
"""
from __future__ import annotations

import torch

from . import backend
from .kernels.checks import conv_output_size
from .layout_tensor import layout_of

__all__ = ["matmul", "matmul_backward", "conv2d", "conv2d_backward"]

_lib = torch.library.Library("numbasparse", "DEF")
_lib.define("matmul(Tensor x, Tensor w, Tensor? bias, Tensor layout, int block_size, int out_features) -> Tensor")
_lib.define("matmul_backward(Tensor dy, Tensor x, Tensor w, Tensor layout, int block_size, bool need_dx, "
            "bool need_dw) -> (Tensor, Tensor)")
_lib.define("conv2d(Tensor x, Tensor w, Tensor layout, int block_size, int out_channels, int[2] stride, "
            "int[4] padding, int[2] dilation) -> Tensor")
_lib.define("conv2d_backward(Tensor dy, Tensor x, Tensor w, Tensor layout, int block_size, int[2] stride, "
            "int[4] padding, int[2] dilation, bool need_dx, bool need_dw) -> (Tensor, Tensor)")


# ------------------------------------------------------------------ kernels
def _matmul(x, w, bias, layout, block_size, out_features):
    return backend._forward(x, w, layout_of(layout), block_size, bias)


def _matmul_backward(dy, x, w, layout, block_size, need_dx, need_dw):
    dx, dw = backend._backward(dy, x, w, layout_of(layout), block_size, need_dx, need_dw)
    return (dx if need_dx else x.new_empty(0)), (dw if need_dw else w.new_empty(0))


def _conv2d(x, w, layout, block_size, out_channels, stride, padding, dilation):
    return backend._conv_forward(x, w, layout_of(layout), block_size, tuple(stride), tuple(padding), tuple(dilation))


def _conv2d_backward(dy, x, w, layout, block_size, stride, padding, dilation, need_dx, need_dw):
    layout = layout_of(layout)
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    dx = backend._conv_backward_data(dy, w, layout, block_size, *geometry, tuple(x.shape[2:])) if need_dx \
        else x.new_empty(0)
    dw = backend._conv_backward_weight(x, dy, tuple(w.shape), layout, block_size, *geometry) if need_dw \
        else w.new_empty(0)
    return dx, dw


for _name, _kernel in (("matmul", _matmul), ("matmul_backward", _matmul_backward), ("conv2d", _conv2d),
                       ("conv2d_backward", _conv2d_backward)):
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _kernel, _key)


# ------------------------------------------------------------------ shapes
@torch.library.register_fake("numbasparse::matmul")
def _matmul_fake(x, w, bias, layout, block_size, out_features):
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("numbasparse::matmul_backward")
def _matmul_backward_fake(dy, x, w, layout, block_size, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


@torch.library.register_fake("numbasparse::conv2d")
def _conv2d_fake(x, w, layout, block_size, out_channels, stride, padding, dilation):
    size = conv_output_size(x.shape[2:], w.shape[1:3], stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, *size))


@torch.library.register_fake("numbasparse::conv2d_backward")
def _conv2d_backward_fake(dy, x, w, layout, block_size, stride, padding, dilation, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


# ------------------------------------------------------------------ autograd
def _matmul_setup(ctx, inputs, output):
    x, w, bias, layout, block_size, _ = inputs
    ctx.save_for_backward(x, w, layout)
    ctx.block_size = block_size


def _matmul_grad(ctx, dy):
    x, w, layout = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx = dw = None
    if need_dx or need_dw:
        dx, dw = torch.ops.numbasparse.matmul_backward(dy.contiguous(), x, w, layout, ctx.block_size,
                                                       need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, dy.sum(0) if need_db else None,
            None, None, None)


def _conv2d_setup(ctx, inputs, output):
    x, w, layout, block_size, _, stride, padding, dilation = inputs
    ctx.save_for_backward(x, w, layout)
    ctx.args = (block_size, stride, padding, dilation)


def _conv2d_grad(ctx, dy):
    x, w, layout = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx = dw = None
    if need_dx or need_dw:
        dx, dw = torch.ops.numbasparse.conv2d_backward(dy.contiguous(), x, w, layout, *ctx.args, need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, None, None, None, None, None, None


torch.library.register_autograd("numbasparse::matmul", _matmul_grad, setup_context=_matmul_setup)
torch.library.register_autograd("numbasparse::conv2d", _conv2d_grad, setup_context=_conv2d_setup)


# ------------------------------------------------------------------ autocast
# As for nn.Linear / nn.Conv2d: under autocast, float32 and 16-bit inputs are cast to
# the autocast dtype of the call (float64 ones stay), the kernels compute in it (with
# float32 accumulation) and return it; the casts' own backward brings the gradients
# of float32 parameters back to float32.  torch.library.register_autocast casts to
# one fixed dtype, hence this rule, which reads the dtype at each call.
def _autocast_arg(value, device_type, dtype):
    if isinstance(value, torch.Tensor) and value.device.type == device_type \
            and value.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype)
    return value


def _register_autocast(name: str, device_type: str) -> None:
    op = getattr(torch.ops.numbasparse, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def rule(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_autocast_arg(a, device_type, dtype) for a in args))

    op.py_impl(key)(rule)
    _lib.impl(name, lambda _keyset, *args: rule(*args), key_name, with_keyset=True)


for _name in ("matmul", "conv2d"):
    for _device in ("cpu", "cuda"):
        _register_autocast(_name, _device)


# ------------------------------------------------------------------ vmap
def _unbatched(name, in_dims, which):
    for position, label in which:
        if in_dims[position] is not None:
            raise NotImplementedError(f"vmap over {label} of numbasparse.{name} is not supported: map over the "
                                      "input (x) only, with the weight and layout shared")


def _matmul_vmap(info, in_dims, x, w, bias, layout, block_size, out_features):
    _unbatched("matmul", in_dims, ((1, "the weight"), (2, "the bias"), (3, "the layout")))
    x = x.movedim(in_dims[0], 0)
    batch, rows = x.shape[0], x.shape[1]
    y = torch.ops.numbasparse.matmul(x.reshape(batch * rows, -1).contiguous(), w, bias, layout, block_size,
                                     out_features)
    return y.reshape(batch, rows, out_features), 0


def _conv2d_vmap(info, in_dims, x, w, layout, block_size, out_channels, stride, padding, dilation):
    _unbatched("conv2d", in_dims, ((1, "the weight"), (2, "the layout")))
    x = x.movedim(in_dims[0], 0)
    batch, images = x.shape[0], x.shape[1]
    y = torch.ops.numbasparse.conv2d(x.reshape(batch * images, *x.shape[2:]).contiguous(), w, layout, block_size,
                                     out_channels, stride, padding, dilation)
    return y.reshape(batch, images, *y.shape[1:]), 0


def _backward_vmap(name):
    def rule(info, in_dims, *args):
        raise NotImplementedError(
            f"vmap over the gradient of numbasparse.{name} is not supported (per-sample weight gradients "
            "would need one weight gradient per mapped input): compute it outside vmap")
    return rule


torch.library.register_vmap("numbasparse::matmul", _matmul_vmap)
torch.library.register_vmap("numbasparse::conv2d", _conv2d_vmap)
torch.library.register_vmap("numbasparse::matmul_backward", _backward_vmap("matmul"))
torch.library.register_vmap("numbasparse::conv2d_backward", _backward_vmap("conv2d"))

# ------------------------------------------------------------------ torch.func
class FunctionalMatmul(torch.autograd.Function):
    """The matmul operator as an autograd Function with ``setup_context`` (which
    ``torch.func`` transforms need): :func:`~numbasparse.functional.matmul_op` uses it
    while a transform (grad, vmap, jacrev, ...) is active."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, bias, layout, block_size, out_features):
        return torch.ops.numbasparse.matmul(x, w, bias, layout, block_size, out_features)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _matmul_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy):
        return _matmul_grad(ctx, dy)


class FunctionalConv2d(torch.autograd.Function):
    """The conv2d operator for ``torch.func`` transforms (see :class:`FunctionalMatmul`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, layout, block_size, out_channels, stride, padding, dilation):
        return torch.ops.numbasparse.conv2d(x, w, layout, block_size, out_channels, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _conv2d_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dy):
        return _conv2d_grad(ctx, dy)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform is running."""
    return torch._C._are_functorch_transforms_active()


matmul = torch.ops.numbasparse.matmul.default
matmul_backward = torch.ops.numbasparse.matmul_backward.default
conv2d = torch.ops.numbasparse.conv2d.default
conv2d_backward = torch.ops.numbasparse.conv2d_backward.default
