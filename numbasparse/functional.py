"""Functional API with autograd: ``block_sparse_matmul`` (and, in :mod:`.conv`,
``block_sparse_conv2d``; in :mod:`.functional_lstm`, ``block_sparse_lstm``; in
:mod:`.sampled`, ``sampled_matmul``)."""
from __future__ import annotations

import torch

from . import eager, ops
from ._checks import (as_layout, block_size_of, check_features, check_same_placement,
                      check_tensor, check_weight_shape)
from .layout_tensor import layout_tensor

__all__ = ["block_sparse_matmul", "block_sparse_conv2d", "block_sparse_lstm", "sampled_matmul"]


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
        live input block are exactly zero (or the bias).  Runs the
        ``torch.ops.numbasparse.matmul`` operator (:mod:`numbasparse.ops`).
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
    return matmul_op(x, w, bias, layout_tensor(layout, x.device), block_size, out_features)


def matmul_op(x: torch.Tensor, w: torch.Tensor, bias, layout_t: torch.Tensor, block_size: int,
              out_features: int) -> torch.Tensor:
    """The ``torch.ops.numbasparse.matmul`` operator on checked arguments, over any
    leading dims of ``x`` (``layout_t``: :func:`~numbasparse.layout_tensor.layout_tensor`)."""
    flat = x.dim() == 2
    x2d = x if flat else (x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0))
    args = (x2d.contiguous(), w.contiguous(), None if bias is None else bias.contiguous(), layout_t, block_size,
            out_features)
    if eager.eager_allowed(*args[:3]):
        y = eager.matmul(*args)
    else:
        y = ops.FunctionalMatmul.apply(*args) if ops.transforms_active() else ops.matmul(*args)
    return y if flat else y.reshape(*x.shape[:-1], out_features)


from .conv import block_sparse_conv2d  # noqa: E402
from .functional_lstm import block_sparse_lstm  # noqa: E402
from .sampled import sampled_matmul  # noqa: E402
