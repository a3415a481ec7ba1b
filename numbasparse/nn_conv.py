"""``torch.nn`` module :class:`BlockSparseConv2d`: a 2-D convolution whose channel
connectivity is a :class:`~numbasparse.layout.BlockLayout`."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn

from . import layouts
from ._checks import (as_layout, autocast_input, check_block_size, check_image_batch, check_module_input,
                      unbatched_image)
from .conv import conv2d_op, conv_blocks_from_dense, conv_geometry, dense_conv_weight
from .storage import BlockStorage

__all__ = ["BlockSparseConv2d"]


def _kernel_pair(kernel_size):
    values = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size, kernel_size)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise TypeError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
    return int(values[0]), int(values[1])


def _as_pair_or_str(value):
    if isinstance(value, str):
        return value
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class BlockSparseConv2d(BlockStorage, nn.Module):
    """``y = conv2d(x, W) + bias`` with W block-sparse over channels: only the layout's
    ``B x B`` channel blocks are stored and computed (at every tap of the kernel).

    Args:
        in_channels, out_channels: must equal ``layout.in_blocks * block_size`` and
            ``layout.out_blocks * block_size``.
        kernel_size: int or ``(kh, kw)``.
        layout: :class:`BlockLayout` (or a 2-D 0/1 block mask) of shape
            ``(in_channels // B, out_channels // B)``.
        block_size: B in {8, 16, 32}.
        stride, padding, dilation: as in ``nn.Conv2d`` (``padding`` may be an int, a
            pair, ``'same'`` or ``'valid'``).
        bias: learn an additive per-output-channel bias ``(out_channels,)``.

    Input ``(N, in_channels, H, W)`` (NCHW), output ``(N, out_channels, Ho, Wo)``.

    Attributes:
        weight: ``(layout.capacity, kh, kw, B, B)``: ``weight[s, dh, dw, k, c]`` multiplies
            input channel ``iB + k`` into output channel ``jB + c`` at tap ``(dh, dw)``
            for the live entry ``(i, j)`` stored in slot ``s``.
        layout: the current :class:`BlockLayout`; saved in ``state_dict`` (extra state).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, layout, block_size: int = 16,
                 stride=1, padding=0, dilation=1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        block_size = check_block_size(block_size)
        layout = as_layout(layout)
        if in_channels != layout.in_blocks * block_size:
            raise ValueError(f"in_channels={in_channels} does not match the layout: {layout.in_blocks} "
                             f"input blocks of size {block_size} = {layout.in_blocks * block_size}")
        if out_channels != layout.out_blocks * block_size:
            raise ValueError(f"out_channels={out_channels} does not match the layout: {layout.out_blocks} "
                             f"output blocks of size {block_size} = {layout.out_blocks * block_size}")
        self.kernel_size = _kernel_pair(kernel_size)
        kh, kw = self.kernel_size
        conv_geometry((1 << 20, 1 << 20), (kh, kw), stride, padding, dilation)  # validates the arguments
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.block_size = block_size
        self.stride = _as_pair_or_str(stride)
        self.padding = _as_pair_or_str(padding)
        self.dilation = _as_pair_or_str(dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layout.capacity, kh, kw, block_size, block_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.layout = layout
        self.reset_parameters()
        self._track_storage()

    def reset_parameters(self) -> None:
        """Uniform init with bound ``1/sqrt(fan_in)``, ``fan_in`` being each output block's
        live fan-in (live input blocks * B * kh * kw), as ``nn.Conv2d`` does with its
        dense fan-in."""
        kh, kw = self.kernel_size
        fan_in = np.maximum(np.diff(np.asarray(self.layout.col_ptr)), 1) * self.block_size * kh * kw
        with torch.no_grad():
            self.weight.zero_()
            for s, j in zip(self.layout.entry_slots, self.layout.entry_cols):
                bound = 1.0 / math.sqrt(fan_in[j])
                self.weight[int(s)].uniform_(-bound, bound)
            if self.bias is not None and fan_in.size:
                bound = 1.0 / math.sqrt(float(fan_in.mean()))
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(N, in_channels, H, W)`` -> ``(N, out_channels, Ho, Wo)``; an unbatched
        ``(in_channels, H, W)`` gives ``(out_channels, Ho, Wo)``, as with ``nn.Conv2d``."""
        if unbatched_image(x):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = self._conv(x, self.weight)
        return y if self.bias is None else y + autocast_input(self.bias).view(1, -1, 1, 1)

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The block-sparse convolution of ``x`` with blocks ``w`` (``weight``'s shape)
        and this layer's geometry, through the conv2d operator."""
        x, w = autocast_input(x), autocast_input(w)
        check_image_batch(x)
        check_module_input(x, w, self.in_channels, 1, "channels")
        geometry = conv_geometry(tuple(x.shape[2:]), self.kernel_size, self.stride, self.padding, self.dilation)
        return conv2d_op(x, w, self.kernel_layout, self.block_size, self.out_channels, geometry)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_channels, in_channels, kh, kw)`` weight, shaped like
        ``nn.Conv2d.weight`` (zeros outside the layout); differentiable."""
        return dense_conv_weight(self.weight, self.layout, self.block_size)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block_size: int = 16, density: float | None = None,
                   threshold: float | None = None) -> "BlockSparseConv2d":
        """Keep the channel blocks of ``conv.weight`` with the largest Frobenius norm over
        the block and all its taps (see :func:`numbasparse.layouts.from_dense`), and copy
        their values, the bias, stride, padding and dilation."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"from_dense needs groups=1, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"from_dense needs padding_mode='zeros', got {conv.padding_mode!r}")
        block_size = check_block_size(block_size)
        for name, size in (("in_channels", conv.in_channels), ("out_channels", conv.out_channels)):
            if size % block_size:
                raise ValueError(f"{name}={size} is not a multiple of block_size {block_size}")
        dense = conv.weight.detach()                                   # (out, in, kh, kw)
        # (in, out) matrix whose B x B block norms are the norms over block and taps
        tap_norms = dense.double().pow(2).sum(dim=(2, 3)).sqrt().t()
        layout = layouts.from_dense(tap_norms, block_size, density=density, threshold=threshold)
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, layout, block_size,
                     stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                     bias=conv.bias is not None, device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            module.weight.copy_(conv_blocks_from_dense(dense, layout, block_size))
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        return module

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, block_size={self.block_size}, "
                f"nnz={self.layout.nnz}, density={self.layout.density:.3f}, bias={self.bias is not None}")
