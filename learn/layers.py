"""Block-sparse layers with one hard-concrete L0 gate per weight block.

A gated layer stores its weight as ``(capacity, ...)`` blocks addressed by its
:class:`~numbasparse.layout.BlockLayout` (see :mod:`numbasparse.nn`) and owns a
:class:`~learn.gates.HardConcreteGate` with one gate per *storage slot*
(``gate.log_alpha`` has shape ``(capacity,)``).  Gate ``s`` scales block
``weight[s]`` before the block-sparse kernel sees it, in training (sampled gates)
and evaluation (deterministic gates) alike; the product is never densified.

Because gates live per slot, removing a block or regrowing one into a free slot
edits the layout's tables and a few entries of ``weight``/``log_alpha``, never the
Parameters' shapes, so optimizers, DDP and checkpoints keep working.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from numbasparse import layouts as _layouts
from numbasparse._checks import (autocast_input, check_block_size, check_image_batch, check_module_input,
                                unbatched_image)
from numbasparse.functional import matmul_op
from numbasparse.layout_tensor import layout_tensor
from numbasparse.nn import BlockSparseLinear, blocks_to_dense

from .gates import HardConcreteGate

__all__ = ["L0BlockSparseLinear", "L0BlockSparseConv2d", "GatedBlockSparse", "gated_layers",
           "gate_parameters", "block_grad_norms", "HAVE_CONV"]


class GatedBlockSparse:
    """Mixin for block-sparse layers gated per storage slot.

    The host class provides ``weight (capacity, ...)``, ``layout``, ``block_size``,
    ``set_layout()`` and ``compact()`` (the numbasparse layer API); the mixin adds
    ``gate``, the gated kernel operands and the pieces :class:`~learn.dynamic.DynamicSparsity`
    uses (block FLOPs, capture of the last batch for gradient-based regrowth).
    """

    gate: HardConcreteGate

    def _init_gate(self, beta, gamma, zeta, init_keep, seed):
        w = self.weight
        self.gate = HardConcreteGate(self.layout.capacity, beta=beta, gamma=gamma, zeta=zeta,
                                     init_keep=init_keep, seed=seed, device=w.device, dtype=w.dtype)
        self._reset_gates()
        self._capture = False
        self._captured = None

    def _refresh_kernel_tensors(self) -> None:
        """Buffers for the ops: ``kernel_slots`` (the live slots in entry order) and
        ``kernel_layout``: while the layout has free slots, its compacted form, which the
        gathered live blocks run against."""
        super()._refresh_kernel_tensors()
        layout = self._layout
        device = self.kernel_layout.device
        self._all_live = layout.nnz == layout.capacity
        if not self._all_live:
            self.register_buffer("kernel_layout", layout_tensor(layout.compacted(), device), persistent=False)
        self.register_buffer("kernel_slots", layout.index_tensor("entry_slots", device), persistent=False)

    # --------------------------------------------------------------- gates
    def gate_values(self) -> torch.Tensor:
        """``(capacity,)`` gate per slot: sampled in training mode, deterministic in eval."""
        return self.gate()

    def live_slots(self, device=None) -> torch.Tensor:
        """``(nnz,)`` int64 slots of the live blocks, in the layout's row-major entry order."""
        slots = self.kernel_slots
        return slots if device is None else slots.to(device)

    def prob_nonzero_live(self) -> torch.Tensor:
        """``(nnz,)`` keep probabilities of the live blocks (differentiable)."""
        return self.gate.prob_nonzero()[self.live_slots()]

    def block_flops(self) -> int:
        """Multiply-adds per sample done by one live block (the FLOPs weighting of
        :func:`~learn.penalty.l0_penalty`)."""
        raise NotImplementedError

    def _kernel_operands(self):
        """``(w, layout tensor)`` to hand the operator: the gated blocks ``weight * z`` with
        the layout, or, while the layout has free slots, only the live gated blocks
        (gathered in entry order) with the compacted layout: same values, no work or
        memory traffic for free slots.  Under autocast, in the autocast dtype; the gates
        (float32 even in a 16-bit layer) are rounded to the weight's dtype."""
        z = self.gate_values()
        if self._all_live:
            return autocast_input(self.gated_weight(z)), self.kernel_layout
        slots = self.kernel_slots
        w = self.weight.index_select(0, slots)
        w = w * z.index_select(0, slots).to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
        return autocast_input(w), self.kernel_layout

    def gated_weight(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """``weight * z`` broadcast over the block dims: ``(capacity, ...)``; ``z`` ``(capacity,)``
        defaults to :meth:`gate_values`."""
        if z is None:
            z = self.gate_values()
        return self.weight * z.to(self.weight.dtype).view(-1, *([1] * (self.weight.dim() - 1)))

    # -------------------------------------------------- gradient capture
    def _arm_capture(self, enabled: bool) -> None:
        self._capture = bool(enabled)
        if not enabled:
            self._captured = None

    def _maybe_capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the input and (via a hook) the output gradient of this batch, when armed."""
        if not (self._capture and torch.is_grad_enabled() and y.requires_grad):
            return
        record = {"x": x.detach(), "dy": None}
        self._captured = record

        def hook(grad):
            record["dy"] = grad.detach()

        y.register_hook(hook)

    def captured_weight_grad(self) -> torch.Tensor | None:
        """Dense gradient of the (gated) weight on the captured batch, every block position
        included: ``(in_blocks*B, out_blocks*B, ...)`` (``x^T dy`` for a linear layer), or None
        when nothing was captured.  Local to this process (not reduced across DDP ranks)."""
        raise NotImplementedError

    # ------------------------------------------------------ slot storage
    def _slot_parameter_names(self) -> list:
        return ["weight", "gate.log_alpha"]

    def _storage_resized(self) -> None:
        self.gate.n = int(self.gate.log_alpha.shape[0])
        self.gate._find_dead()

    def reset_parameters(self) -> None:
        """Re-initialize the weight and bias (as the host layer does) and the gates."""
        super().reset_parameters()
        self._reset_gates()

    def _load_slot_children(self, state_dict, prefix):
        self.gate._load_values(state_dict, prefix + "gate.")

    def _reset_gates(self) -> None:
        """Gates to ``init_keep``, closed on the layout's free slots."""
        gate = self._modules.get("gate")
        if gate is None:  # the host's constructor resets before the gate exists
            return
        gate.reset_parameters()
        free = self.layout.free_slots()
        if free.size:
            gate.kill_(free)


class L0BlockSparseLinear(GatedBlockSparse, BlockSparseLinear):
    """``y = x @ (W * z) + bias``: a :class:`~numbasparse.nn.BlockSparseLinear` whose live
    blocks are scaled by hard-concrete gates ``z`` (one per storage slot).

    Args:
        in_features, out_features: multiples of ``block_size``.
        layout: initial :class:`BlockLayout` or 0/1 block mask of shape
            ``(in_features // B, out_features // B)``; default: every block live.
        block_size: B in {8, 16, 32}.
        bias: learn a bias ``(out_features,)`` (not gated).
        init_keep, beta, gamma, zeta, seed: the gate settings (:class:`HardConcreteGate`).

    Attributes:
        weight: ``(capacity, B, B)`` blocks; ``gate.log_alpha``: ``(capacity,)``.
        layout: the current layout (kernel tables cover live blocks only).

    Shapes: ``x (..., in_features) -> (..., out_features)``.  The kernel always receives
    the gated blocks, ``block_sparse_matmul(x, weight * z[:, None, None], layout)``; while the
    layout has free slots, the gated live blocks are gathered first and run against the
    compacted layout (same values, no work for free slots).  In training mode one gate
    sample per forward call is shared by the whole batch.
    """

    def __init__(self, in_features: int, out_features: int, layout=None, block_size: int = 32,
                 bias: bool = True, init_keep: float = 0.9, beta: float = 2 / 3, gamma: float = -0.1,
                 zeta: float = 1.1, seed: int | None = None, device=None, dtype=None):
        if layout is None:
            layout = _dense_layout(in_features, out_features, block_size)
        super().__init__(in_features, out_features, layout, block_size, bias=bias, device=device, dtype=dtype)
        self._init_gate(beta, gamma, zeta, init_keep, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(..., in_features)`` -> ``(..., out_features)``."""
        w, layout_t = self._kernel_operands()
        x = autocast_input(x)
        check_module_input(x, w, self.in_features, -1, "features")
        y = matmul_op(x, w, None, layout_t, self.block_size, self.out_features)
        self._maybe_capture(x, y)
        return y if self.bias is None else y + autocast_input(self.bias)

    def block_flops(self) -> int:
        """``B * B`` multiply-adds per sample (per row of x) for one block."""
        return self.block_size * self.block_size

    def captured_weight_grad(self):
        rec = self._captured
        if rec is None or rec["dy"] is None:
            return None
        x = rec["x"].reshape(-1, self.in_features)
        dy = rec["dy"].reshape(-1, self.out_features)
        return x.t() @ dy  # (in_features, out_features): dense gradient of W

    def effective_dense(self) -> torch.Tensor:
        """Dense ``(in_features, out_features)`` matrix of the weight scaled by the
        deterministic (evaluation) gates: ``y = x @ effective_dense() + bias`` in eval mode."""
        return blocks_to_dense(self.gated_weight(self.gate.deterministic()), self.layout, self.block_size)


def block_grad_norms(grad: torch.Tensor, shape, block_size: int) -> torch.Tensor:
    """Frobenius norm of each block of a dense gradient ``(in_blocks*B, out_blocks*B, ...)``
    (trailing dims, e.g. kernel taps, are summed too) -> ``(in_blocks, out_blocks)`` float64."""
    ib, ob = shape
    g = grad.detach().double().reshape(ib, block_size, ob, block_size, -1)
    return g.pow(2).sum(dim=(1, 3, 4)).sqrt()


# --------------------------------------------------------------------- conv
try:  # the conv layer is optional: L0BlockSparseConv2d is usable when numbasparse has it
    from numbasparse.conv import conv2d_op, conv_geometry, dense_conv_weight
    from numbasparse.nn_conv import BlockSparseConv2d as _BlockSparseConv2d
    HAVE_CONV = True
except ImportError:  # pragma: no cover - depends on the installed numbasparse
    _BlockSparseConv2d = nn.Module
    HAVE_CONV = False


class L0BlockSparseConv2d(GatedBlockSparse, _BlockSparseConv2d):
    """``y = conv2d(x, W * z) + bias``: a :class:`numbasparse.nn_conv.BlockSparseConv2d`
    whose live channel blocks are scaled by hard-concrete gates ``z``, one per storage slot
    of its ``(capacity, kh, kw, B, B)`` weight (a gate scales every tap of its block).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, block_size:
            as for ``BlockSparseConv2d``.
        layout: initial :class:`BlockLayout` or 0/1 mask ``(in_channels // B, out_channels // B)``;
            default: every channel block live.
        init_keep, beta, gamma, zeta, seed: the gate settings (:class:`HardConcreteGate`).

    Shapes: ``x (N, in_channels, H, W) -> (N, out_channels, H_out, W_out)``.  The conv
    kernel receives the gated blocks ``block_sparse_conv2d(x, weight * z[:, None, None, None, None],
    layout, ...)`` (live blocks only while the layout has free slots), in train and eval
    modes; one gate sample per forward call in training mode.

    Raises:
        ImportError: this numbasparse has no ``nn_conv.BlockSparseConv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, layout=None, block_size: int = 16,
                 stride=1, padding=0, dilation=1, bias: bool = True, init_keep: float = 0.9,
                 beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1, seed: int | None = None,
                 device=None, dtype=None):
        if not HAVE_CONV:
            raise ImportError("L0BlockSparseConv2d needs numbasparse.nn_conv.BlockSparseConv2d, "
                              "which this numbasparse does not provide")
        if layout is None:
            layout = _dense_layout(in_channels, out_channels, block_size)
        super().__init__(in_channels, out_channels, kernel_size, layout, block_size, stride=stride,
                         padding=padding, dilation=dilation, bias=bias, device=device, dtype=dtype)
        self._init_gate(beta, gamma, zeta, init_keep, seed)
        self._out_positions = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(N, in_channels, H, W)`` -> ``(N, out_channels, H_out, W_out)``; an unbatched
        ``(in_channels, H, W)`` gives ``(out_channels, H_out, W_out)``, as with ``nn.Conv2d``."""
        if unbatched_image(x):
            return self.forward(x.unsqueeze(0)).squeeze(0)
        w, layout_t = self._kernel_operands()
        x = autocast_input(x)
        check_image_batch(x)
        check_module_input(x, w, self.in_channels, 1, "channels")
        geometry = conv_geometry(tuple(x.shape[2:]), self.kernel_size, self.stride, self.padding, self.dilation)
        y = conv2d_op(x, w, layout_t, self.block_size, self.out_channels, geometry)
        self._out_positions = geometry.output_size[0] * geometry.output_size[1]
        self._maybe_capture(x, y)
        return y if self.bias is None else y + autocast_input(self.bias).view(1, -1, 1, 1)

    def block_flops(self) -> int:
        """``B * B * kh * kw * H_out * W_out`` multiply-adds per sample for one block
        (output size from the last forward, kept in ``state_dict``; 1 before the first)."""
        kh, kw = self.kernel_size
        return self.block_size * self.block_size * kh * kw * self._out_positions

    def get_extra_state(self):
        return {**super().get_extra_state(), "out_positions": self._out_positions}

    def set_extra_state(self, state):
        problem = _out_positions_problem(state)
        if problem:
            raise ValueError(problem)
        super().set_extra_state(state)
        self._out_positions = int(state.get("out_positions", 1))

    def _check_checkpoint(self, state_dict, prefix, layout, whose="the checkpoint's"):
        extra = state_dict.get(prefix + "_extra_state")
        return (super()._check_checkpoint(state_dict, prefix, layout, whose)
                or (None if extra is None else _out_positions_problem(extra)))

    def captured_weight_grad(self):
        """Dense ``(in_channels, out_channels, kh, kw)`` gradient of the gated weight on the
        captured batch (the ``nn.Conv2d`` weight gradient, transposed to the layout's orientation)."""
        rec = self._captured
        if rec is None or rec["dy"] is None:
            return None
        x, dy = rec["x"], rec["dy"]
        kh, kw = self.kernel_size
        (sh, sw), (top, left), (dh, dw), (ho, wo) = conv_geometry(
            tuple(x.shape[2:]), (kh, kw), self.stride, self.padding, self.dilation)
        bottom = max(0, (ho - 1) * sh + dh * (kh - 1) + 1 - x.shape[2] - top)
        right = max(0, (wo - 1) * sw + dw * (kw - 1) + 1 - x.shape[3] - left)
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        grad = torch.nn.grad.conv2d_weight(x, (dy.shape[1], x.shape[1], kh, kw), dy,
                                           stride=(sh, sw), padding=0, dilation=(dh, dw))
        return grad.permute(1, 0, 2, 3).contiguous()

    def effective_dense(self) -> torch.Tensor:
        """Dense ``(out_channels, in_channels, kh, kw)`` weight (like ``nn.Conv2d.weight``) scaled
        by the deterministic (evaluation) gates."""
        return dense_conv_weight(self.gated_weight(self.gate.deterministic()), self.layout, self.block_size)


def _out_positions_problem(extra: dict) -> str | None:
    """Checkpoints of the conv layer carry the output size its FLOPs weighting used
    (older ones do not: 1, as before the first forward)."""
    value = extra.get("out_positions", 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        return f"out_positions in the checkpoint must be a positive integer, got {value!r}"
    return None


def _dense_layout(in_features, out_features, block_size):
    block_size = check_block_size(block_size)
    if not (in_features > 0 and out_features > 0 and in_features % block_size == 0
            and out_features % block_size == 0):
        raise ValueError(f"sizes {in_features} and {out_features} must be positive multiples of "
                         f"block_size={block_size!r}")
    return _layouts.dense(in_features // block_size, out_features // block_size)


# ------------------------------------------------------------------ helpers
def gated_layers(model: nn.Module) -> list:
    """``[(name, layer), ...]`` for every gated block-sparse layer in ``model``, in
    ``named_modules()`` order.  A ``DistributedDataParallel`` / ``DataParallel`` wrapper is
    looked through, so names are those of the wrapped model.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GatedBlockSparse)]


def gate_parameters(model: nn.Module) -> list:
    """The ``log_alpha`` Parameters of every gated layer (e.g. for their own optimizer
    group with a larger learning rate)."""
    return [layer.gate.log_alpha for _, layer in gated_layers(model)]
