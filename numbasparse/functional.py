"""Functional API with autograd: ``block_sparse_matmul`` (and, in :mod:`.conv`,
``block_sparse_conv2d``)."""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import backend
from ._checks import (as_layout, block_size_of, check_features, check_same_placement,
                      check_tensor, check_weight_shape)

__all__ = ["block_sparse_matmul", "block_sparse_conv2d"]


class _BlockSparseMatMul(torch.autograd.Function):
    """y (N, K) = x (N, C) @ W (+ bias), W given as blocks w (capacity, B, B) placed by a layout."""

    @staticmethod
    def forward(ctx, x2d, w, bias, layout, block_size):
        ctx.layout = layout
        ctx.block_size = block_size
        ctx.save_for_backward(x2d, w)
        return backend._forward(x2d, w, layout, block_size, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2d, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dw = backend._backward(dy, x2d, w, ctx.layout, ctx.block_size,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def block_sparse_matmul(x: torch.Tensor, w: torch.Tensor, layout, block_size: int | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-sparse ``y = x @ W (+ bias)`` with autograd for ``x``, ``w`` and ``bias``.

    Args:
        x: ``(..., C)`` with ``C = layout.in_blocks * block_size`` (any leading dims;
            non-contiguous inputs are made contiguous once).
        w: ``(layout.capacity, B, B)``; block ``w[s]`` of live entry ``(i, j)`` maps
            ``x[..., iB:(i+1)B]`` into ``y[..., jB:(j+1)B]``.
        layout: a :class:`BlockLayout` or a 2-D 0/1 block mask ``(in_blocks, out_blocks)``.
        block_size: B in {8, 16, 32}; defaults to ``w.shape[-1]``.
        bias: optional ``(K,)``, added to every row (inside the kernel on CPUs).

    Returns:
        ``(..., K)`` with ``K = layout.out_blocks * block_size``; output blocks with no
        live input block are exactly zero (or the bias).
    """
    layout = as_layout(layout)
    check_tensor("x", x)
    check_tensor("w", w)
    block_size = block_size_of(block_size, w)
    check_same_placement(x, w)
    check_weight_shape(w, layout, block_size)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., C)")
    check_features("x", x.shape[-1], layout.in_blocks, block_size, "input")
    out_features = layout.out_blocks * block_size
    if bias is not None:
        check_tensor("bias", bias)
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device} but x is {x.dtype} on {x.device}: "
                            "use one dtype and device")
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), x.shape[-1]).contiguous()
    w = w.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        y = _BlockSparseMatMul.apply(x2d, w, bias, layout, block_size)
    else:
        y = backend._forward(x2d, w, layout, block_size, bias)
    return y.reshape(*lead, out_features)


from .conv import block_sparse_conv2d  # noqa: E402
