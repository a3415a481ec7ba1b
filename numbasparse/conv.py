"""Block-sparse 2-D convolution with autograd: :func:`block_sparse_conv2d`.

The channel connectivity of the convolution is a :class:`BlockLayout` of shape
``(in_channels // B, out_channels // B)``; spatially the convolution is dense (every
tap of a live block is stored and computed).

Weight storage: ``w (capacity, kh, kw, B, B)``.  Block ``w[s]`` of live entry
``(i, j)`` maps input channels ``iB:(i+1)B`` to output channels ``jB:(j+1)B`` at every
tap: ``w[s, dh, dw, k, c]`` multiplies input channel ``iB + k`` into output channel
``jB + c`` at tap ``(dh, dw)``, so ``w[s, dh, dw]`` is laid out like a
:func:`~numbasparse.block_sparse_matmul` block (``x @ w``).  The dense
``nn.Conv2d``-shaped weight is ``dense[jB + c, iB + k, dh, dw] = w[s, dh, dw, k, c]``.

Kernels (numba.njit for CPU tensors, numba.cuda for CUDA tensors) live in
``numbasparse.kernels.{cpu,cuda}.conv``; their designs are described there.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import eager, ops
from ._checks import as_layout, check_block_size, check_same_placement, check_tensor
from .layout import BlockLayout
from .layout_tensor import layout_tensor

__all__ = ["block_sparse_conv2d", "conv_geometry", "ConvGeometry", "dense_conv_weight", "conv_blocks_from_dense"]


class ConvGeometry(NamedTuple):
    """Validated geometry of one convolution call: pairs ``stride (sh, sw)``,
    ``padding (top, left)`` (the bottom / right padding only shows in the output size),
    ``dilation (dil_h, dil_w)`` and ``output_size (Ho, Wo)``."""

    stride: tuple
    padding: tuple
    dilation: tuple
    output_size: tuple


def _pair(value, name, minimum):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {len(value)} values: {tuple(value)!r}")
        values = tuple(value)
    else:
        values = (value, value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            kind = "positive" if minimum > 0 else "non-negative"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(values[0]), int(values[1])


def conv_geometry(input_size, kernel_size, stride=1, padding=0, dilation=1) -> ConvGeometry:
    """Validate ``stride``/``padding``/``dilation`` the way ``torch.nn.functional.conv2d``
    accepts them and return the :class:`ConvGeometry` for an ``(H, W)`` input and a
    ``(kh, kw)`` kernel.

    ``padding`` is an int, a pair, ``'valid'`` (no padding) or ``'same'`` (output size
    equal to the input size; stride 1 only; an odd total padding puts the extra row /
    column at the bottom / right, as PyTorch does).  ``input_size`` and ``kernel_size``
    are ints or pairs of ints (sizes >= 0 and >= 1).
    """
    sh, sw = _pair(stride, "stride", 1)
    dil = _pair(dilation, "dilation", 1)
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {(sh, sw)}")
            total_h, total_w = dil[0] * (kh - 1), dil[1] * (kw - 1)
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        ph, pw = _pair(padding, "padding", 0)
        pads = (ph, ph, pw, pw)
    height, width = _pair(input_size, "input_size", 0)
    out_h = (height + pads[0] + pads[1] - dil[0] * (kh - 1) - 1) // sh + 1
    out_w = (width + pads[2] + pads[3] - dil[1] * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input of spatial size {(height, width)} is too small for kernel {(kh, kw)} with "
                         f"dilation {dil} and padding {padding!r}: the output would be {(out_h, out_w)}")
    return ConvGeometry((sh, sw), (pads[0], pads[2]), dil, (out_h, out_w))


def _kernel_padding(geometry, input_size, kernel_size) -> tuple:
    """``(top, left, bottom, right)`` padding for the kernel functions, which check that
    ``y`` / ``dy`` have the output size it gives: the geometry's top / left padding and
    the smallest non-negative bottom / right padding giving ``geometry.output_size``
    (the bottom / right padding sets nothing but the output size)."""
    ends = []
    for axis in range(2):
        span = geometry.dilation[axis] * (kernel_size[axis] - 1) + 1
        needed = (geometry.output_size[axis] - 1) * geometry.stride[axis] + span
        ends.append(max(0, needed - input_size[axis] - geometry.padding[axis]))
    return (*geometry.padding, *ends)


def block_sparse_conv2d(x: torch.Tensor, w: torch.Tensor, layout, block_size: int | None = None, stride=1,
                        padding=0, dilation=1) -> torch.Tensor:
    """Block-sparse ``conv2d(x, W)`` (no bias) with autograd for ``x`` and ``w``.

    Args:
        x: ``(N, C, H, W)`` (NCHW) with ``C = layout.in_blocks * B``; made contiguous once.
        w: ``(layout.capacity, kh, kw, B, B)``: ``w[s, dh, dw, k, c]`` multiplies input
            channel ``iB + k`` into output channel ``jB + c`` at tap ``(dh, dw)`` for the
            live entry ``(i, j)`` stored in slot ``s``.
        layout: :class:`BlockLayout` (or a 2-D 0/1 block mask) of shape
            ``(in_channels // B, out_channels // B)``.
        block_size: B in {8, 16, 32}; defaults to ``w.shape[-1]``.
        stride, padding, dilation: as in ``torch.nn.functional.conv2d`` (ints or pairs;
            ``padding`` may also be ``'same'`` (stride 1) or ``'valid'``).

    Returns:
        ``(N, layout.out_blocks * B, Ho, Wo)``; output channel blocks with no live input
        block are exactly zero.  Equal to ``F.conv2d(x, dense, stride=..., padding=...,
        dilation=...)`` with ``dense`` the ``(out, in, kh, kw)`` weight of the blocks.
        Runs the ``torch.ops.numbasparse.conv2d`` operator.
    """
    layout = as_layout(layout)
    check_tensor("x", x)
    check_tensor("w", w)
    check_same_placement(x, w)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got {x.dim()}-D shape {tuple(x.shape)}")
    if w.dim() != 5:
        raise ValueError(f"w must be 5-D (capacity, kh, kw, B, B), got {w.dim()}-D shape {tuple(w.shape)}")
    block_size = check_block_size(int(w.shape[-1]) if block_size is None else block_size)
    kh, kw = int(w.shape[1]), int(w.shape[2])
    expected = (layout.capacity, kh, kw, block_size, block_size)
    if tuple(w.shape) != expected or kh < 1 or kw < 1:
        raise ValueError(f"w must have shape (capacity, kh, kw, B, B) = (layout.capacity={layout.capacity}, kh, kw, "
                         f"{block_size}, {block_size}) with kh, kw >= 1, got {tuple(w.shape)}")
    if x.shape[1] != layout.in_blocks * block_size:
        raise ValueError(f"x has {x.shape[1]} channels but the layout has {layout.in_blocks} input blocks of size "
                         f"{block_size} ({layout.in_blocks * block_size} channels)")
    geometry = conv_geometry(tuple(x.shape[2:]), (kh, kw), stride, padding, dilation)
    return conv2d_op(x, w, layout_tensor(layout, x.device), block_size, layout.out_blocks * block_size, geometry)


def conv2d_op(x, w, layout_t, block_size: int, out_channels: int, geometry: ConvGeometry) -> torch.Tensor:
    """The conv2d operator on checked arguments (``geometry`` from :func:`conv_geometry`
    for ``x``'s size and ``w``'s kernel)."""
    padding = _kernel_padding(geometry, tuple(x.shape[2:]), tuple(w.shape[1:3]))
    args = (x.contiguous(), w.contiguous(), layout_t, block_size, out_channels, list(geometry.stride),
            list(padding), list(geometry.dilation))
    if eager.eager_allowed(args[0], args[1]):
        return eager.conv2d(args[0], args[1], layout_t, block_size, geometry.stride, padding, geometry.dilation)
    return ops.FunctionalConv2d.apply(*args) if ops.transforms_active() else ops.conv2d(*args)


def _check_dense_args(name: str, t, layout, block_size) -> tuple:
    """``(layout, B)`` after checking that ``t`` is a torch tensor and ``layout`` (a
    BlockLayout or a mask) and ``block_size`` are valid."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return as_layout(layout), check_block_size(block_size)


def dense_conv_weight(w: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Dense ``(out_channels, in_channels, kh, kw)`` weight (like ``nn.Conv2d.weight``)
    from blocks ``w (layout.capacity, kh, kw, B, B)``; differentiable in ``w``, zeros
    where the layout has no block.  ValueError when ``w`` does not fit the layout."""
    layout, B = _check_dense_args("w", w, layout, block_size)
    if w.dim() != 5 or w.shape[0] != layout.capacity or tuple(w.shape[3:]) != (B, B) \
            or w.shape[1] < 1 or w.shape[2] < 1:
        raise ValueError(f"w must have shape (capacity, kh, kw, B, B) = ({layout.capacity}, kh, kw, {B}, {B}) "
                         f"with kh, kw >= 1, got {tuple(w.shape)}")
    kh, kw = w.shape[1], w.shape[2]
    rows = layout.index_tensor("entry_rows", w.device)
    cols = layout.index_tensor("entry_cols", w.device)
    slots = layout.index_tensor("entry_slots", w.device)
    dense = w.new_zeros(layout.out_blocks, layout.in_blocks, B, B, kh, kw)   # [j, i, c, k, dh, dw]
    dense[cols, rows] = w[slots].permute(0, 4, 3, 1, 2)
    return dense.permute(0, 2, 1, 3, 4, 5).reshape(layout.out_blocks * B, layout.in_blocks * B, kh, kw)


def conv_blocks_from_dense(dense: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Blocks ``(capacity, kh, kw, B, B)`` cut from a dense ``(out, in, kh, kw)`` weight at
    the layout's live entries (free slots are zero); ``out = layout.out_blocks * B``,
    ``in = layout.in_blocks * B``, else ValueError."""
    layout, B = _check_dense_args("dense", dense, layout, block_size)
    expected = (layout.out_blocks * B, layout.in_blocks * B)
    if dense.dim() != 4 or tuple(dense.shape[:2]) != expected or dense.shape[2] < 1 or dense.shape[3] < 1:
        raise ValueError(f"dense must have shape (out_channels, in_channels, kh, kw) = ({expected[0]}, "
                         f"{expected[1]}, kh, kw) with kh, kw >= 1 for this layout and block size {B}, "
                         f"got {tuple(dense.shape)}")
    kh, kw = dense.shape[2], dense.shape[3]
    blocks = dense.reshape(layout.out_blocks, B, layout.in_blocks, B, kh, kw)   # [j, c, i, k, dh, dw]
    rows = layout.index_tensor("entry_rows", dense.device)
    cols = layout.index_tensor("entry_cols", dense.device)
    slots = layout.index_tensor("entry_slots", dense.device)
    out = dense.new_zeros(layout.capacity, kh, kw, B, B)
    out[slots] = blocks[cols, :, rows].permute(0, 3, 4, 2, 1)   # [e, c, k, dh, dw] -> [e, dh, dw, k, c]
    return out
