"""The eager fast path: plain eager calls run the kernels without the dispatcher's
Python layers.

The registered operators (:mod:`numbasparse.ops`) are what ``torch.compile``,
``torch.export``, ``torch.func``, autocast, fake tensors and tensor subclasses see.  In a
plain eager call they cost more than the kernel at small sizes: a Python kernel behind
the dispatcher plus the Python autograd layer ``torch.library.register_autograd`` adds
~10 us per forward and ~45 us per training step of a 256x256 layer (the kernel itself
takes ~15 us).  When nothing but eager autograd is watching - no compiler, tracer,
transform, dispatch or function mode, no autocast, only plain CPU/CUDA tensors - the
functions here call the same backend functions the operators call, through a classic
``torch.autograd.Function`` (or directly when no gradient is needed).  Results are the
same to the bit; double backward raises, as through the operators.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backend
from .layout_tensor import layout_of

__all__ = ["eager_allowed", "matmul", "conv2d"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_allowed(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether a call on ``x``, ``w`` and ``bias`` (or None) may take the fast path."""
    if (torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()):
        return False
    return (type(x) in _PLAIN and type(w) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and (x.is_cpu or x.is_cuda))


def _needs_graph(x, w, bias=None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (bias is not None and bias.requires_grad))


def matmul(x, w, bias, layout_t, block_size: int, out_features: int) -> torch.Tensor:
    """``torch.ops.numbasparse.matmul`` on the fast path (same arguments, contiguous)."""
    if _needs_graph(x, w, bias):
        return _Matmul.apply(x, w, bias, layout_t, block_size)
    return backend._forward(x, w, layout_of(layout_t), block_size, bias)


def conv2d(x, w, layout_t, block_size: int, stride, padding, dilation) -> torch.Tensor:
    """``torch.ops.numbasparse.conv2d`` on the fast path (same arguments, contiguous;
    ``padding`` as four values)."""
    if _needs_graph(x, w):
        return _Conv2d.apply(x, w, layout_t, block_size, tuple(stride), tuple(padding), tuple(dilation))
    return backend._conv_forward(x, w, layout_of(layout_t), block_size, tuple(stride), tuple(padding),
                                 tuple(dilation))


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, layout_t, block_size):
        layout = layout_of(layout_t)
        ctx.save_for_backward(x, w)
        ctx.layout, ctx.block_size = layout, block_size
        return backend._forward(x, w, layout, block_size, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = None
        if need_dx or need_dw:
            dx, dw = backend._backward(dy.contiguous(), x, w, ctx.layout, ctx.block_size, need_dx, need_dw)
        return dx, dw, (dy.sum(0) if need_db else None), None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, layout_t, block_size, stride, padding, dilation):
        layout = layout_of(layout_t)
        ctx.save_for_backward(x, w)
        ctx.layout, ctx.args = layout, (block_size, stride, padding, dilation)
        return backend._conv_forward(x, w, layout, block_size, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dy = dy.contiguous()
        block_size, stride, padding, dilation = ctx.args
        dx = backend._conv_backward_data(dy, w, ctx.layout, block_size, stride, padding, dilation,
                                         tuple(x.shape[2:])) if need_dx else None
        dw = backend._conv_backward_weight(x, dy, tuple(w.shape), ctx.layout, block_size, stride, padding,
                                           dilation) if need_dw else None
        return dx, dw, None, None, None, None, None
