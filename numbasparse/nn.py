"""``torch.nn`` modules: :class:`BlockSparseLinear` and the OpenAI-style
:class:`BlocksparseMatMul` object."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import layouts
from ._checks import as_layout, autocast_input, check_block_size, check_module_input
from .functional import block_sparse_matmul, matmul_op
from .layout import BlockLayout
from .storage import BlockStorage

__all__ = ["BlockSparseLinear", "BlocksparseMatMul", "BlockStorage", "blocks_to_dense", "dense_to_blocks"]


def blocks_to_dense(w: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Dense ``(in_blocks*B, out_blocks*B)`` matrix from blocks ``w (capacity, B, B)``
    (differentiable in ``w``; zeros where the layout has no block)."""
    layout, block_size = as_layout(layout), check_block_size(block_size)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (layout.capacity, block_size, block_size):
        raise ValueError(f"w must be a tensor of shape (capacity, B, B) = "
                         f"{(layout.capacity, block_size, block_size)}, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    rows = layout.index_tensor("entry_rows", w.device)
    cols = layout.index_tensor("entry_cols", w.device)
    slots = layout.index_tensor("entry_slots", w.device)
    dense = w.new_zeros(layout.in_blocks, block_size, layout.out_blocks, block_size)
    dense[rows, :, cols, :] = w[slots]
    return dense.reshape(layout.in_blocks * block_size, layout.out_blocks * block_size)


def dense_to_blocks(dense: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """Blocks ``(capacity, B, B)`` cut from a dense ``(in_features, out_features)`` matrix
    at the layout's live entries (free slots are zero)."""
    layout, block_size = as_layout(layout), check_block_size(block_size)
    expected = (layout.in_blocks * block_size, layout.out_blocks * block_size)
    if not isinstance(dense, torch.Tensor) or tuple(dense.shape) != expected:
        raise ValueError(f"dense must be a tensor of shape (in_features, out_features) = {expected}, got "
                         f"{tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__}")
    blocks = dense.reshape(layout.in_blocks, block_size, layout.out_blocks, block_size)
    out = dense.new_zeros(layout.capacity, block_size, block_size)
    rows = layout.index_tensor("entry_rows", dense.device)
    cols = layout.index_tensor("entry_cols", dense.device)
    slots = layout.index_tensor("entry_slots", dense.device)
    out[slots] = blocks[rows, :, cols, :]
    return out


class BlockSparseLinear(BlockStorage, nn.Module):
    """``y = x @ W + bias`` with W block-sparse: only the layout's blocks are stored and computed.

    Args:
        in_features, out_features: sizes of x's and y's last dimension; must equal
            ``layout.in_blocks * block_size`` and ``layout.out_blocks * block_size``.
        layout: :class:`BlockLayout` (or a 2-D 0/1 block mask) of shape
            ``(in_features // B, out_features // B)``.
        block_size: B in {8, 16, 32}.
        bias: learn an additive bias of shape ``(out_features,)``.

    Attributes:
        weight: ``(layout.capacity, B, B)``; block ``weight[s]`` of live entry ``(i, j)``
            maps ``x[..., iB:(i+1)B]`` to ``y[..., jB:(j+1)B]``.
        layout: the current :class:`BlockLayout`; saved in ``state_dict`` (extra state).

    Note the orientation: ``to_dense()`` is ``(in_features, out_features)`` (``x @ W``),
    the transpose of ``nn.Linear.weight``.
    """

    def __init__(self, in_features: int, out_features: int, layout, block_size: int = 32,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        block_size = check_block_size(block_size)
        layout = as_layout(layout)
        if in_features != layout.in_blocks * block_size:
            raise ValueError(f"in_features={in_features} does not match the layout: {layout.in_blocks} "
                             f"input blocks of size {block_size} = {layout.in_blocks * block_size}")
        if out_features != layout.out_blocks * block_size:
            raise ValueError(f"out_features={out_features} does not match the layout: {layout.out_blocks} "
                             f"output blocks of size {block_size} = {layout.out_blocks * block_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layout.capacity, block_size, block_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.layout = layout
        self.reset_parameters()
        self._track_storage()

    def reset_parameters(self) -> None:
        """Uniform init scaled by each output block's live fan-in (as nn.Linear does
        with its dense fan-in), so sparse layers start with unit-scale activations."""
        fan_in = np.maximum(np.diff(np.asarray(self.layout.col_ptr)), 1) * self.block_size
        with torch.no_grad():
            self.weight.zero_()
            for s, j in zip(self.layout.entry_slots, self.layout.entry_cols):
                bound = 1.0 / math.sqrt(fan_in[j])
                self.weight[int(s)].uniform_(-bound, bound)
            if self.bias is not None and fan_in.size:
                bound = 1.0 / math.sqrt(float(fan_in.mean()))
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)``."""
        x, w = autocast_input(x), autocast_input(self.weight)
        bias = None if self.bias is None else autocast_input(self.bias)
        check_module_input(x, w, self.in_features, -1, "features")
        return matmul_op(x, w, bias, self.kernel_layout, self.block_size, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(in_features, out_features)`` matrix W, with ``y = x @ W + bias``."""
        return blocks_to_dense(self.weight, self.layout, self.block_size)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size: int = 32, density: float | None = None,
                   threshold: float | None = None) -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight.T`` with the largest norm (see
        :func:`numbasparse.layouts.from_dense`) and copy their values and the bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        block_size = check_block_size(block_size)
        dense = linear.weight.detach().t()
        layout = layouts.from_dense(dense, block_size, density=density, threshold=threshold)
        module = cls(linear.in_features, linear.out_features, layout, block_size,
                     bias=linear.bias is not None, device=dense.device, dtype=dense.dtype)
        with torch.no_grad():
            module.weight.copy_(dense_to_blocks(dense, layout, block_size))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, nnz={self.layout.nnz}, density={self.layout.density:.3f}, "
                f"bias={self.bias is not None}")


class BlocksparseMatMul:
    """OpenAI-blocksparse-style matmul object.

    ``bsmm = BlocksparseMatMul(layout, block_size=32)``; ``w`` of shape ``bsmm.w_shape``
    ``(nnz, B, B)``; ``y = bsmm(x, w)``.  ``feature_axis=1`` means x is ``(N, C)``;
    ``feature_axis=0`` means x is ``(C, N)`` and y is ``(K, N)``.
    """

    def __init__(self, layout, block_size: int = 32, feature_axis: int = 1):
        block_size = check_block_size(block_size)
        if feature_axis not in (0, 1):
            raise ValueError(f"feature_axis must be 0 or 1, got {feature_axis!r}")
        self.layout = as_layout(layout)
        self.block_size = block_size
        self.feature_axis = feature_axis
        self.C = self.layout.in_blocks * block_size
        self.K = self.layout.out_blocks * block_size

    @property
    def w_shape(self) -> tuple:
        return (self.layout.capacity, self.block_size, self.block_size)

    @property
    def blocks(self) -> int:
        return self.layout.nnz

    def i_shape(self, n: int) -> tuple:
        return (n, self.C) if self.feature_axis == 1 else (self.C, n)

    def o_shape(self, n: int) -> tuple:
        return (n, self.K) if self.feature_axis == 1 else (self.K, n)

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() != 2:
            raise ValueError(f"x must be 2-D {self.i_shape('N')}, got shape {tuple(x.shape)}")
        if self.feature_axis == 0:
            return block_sparse_matmul(x.t(), w, self.layout, self.block_size).t()
        return block_sparse_matmul(x, w, self.layout, self.block_size)

    def fprop_test(self, x, w) -> torch.Tensor:
        """Dense reference ``x @ W`` (or ``W^T x`` for feature_axis 0) for checking."""
        dense = blocks_to_dense(w, self.layout, self.block_size)
        return x @ dense if self.feature_axis == 1 else dense.t() @ x

    def __repr__(self):
        return f"BlocksparseMatMul({self.layout!r}, block_size={self.block_size}, feature_axis={self.feature_axis})"
