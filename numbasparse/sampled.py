"""Sampled matmul with autograd: :func:`sampled_matmul` (re-exported by
:mod:`numbasparse.functional`), the product of each row with a few column blocks of a
dense weight, for output layers that compute only the blocks chosen per input
(:class:`~numbasparse.LSHOutputLayer`).

``y[n, k, :] = x[n] @ w[:, a*B:(a+1)*B]`` with ``a = active[n, k]``.  The kernels group
the (row, block) pairs by block, so each chosen block's weights are read once per call
(:mod:`numbasparse.kernels.cpu.sampled`, :mod:`numbasparse.kernels.cuda.sampled`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import backend
from ._checks import check_block_size

__all__ = ["sampled_matmul"]

_DTYPES = (torch.float32, torch.float64)


def _order(w: torch.Tensor):
    """``(order, operand)``: "cols" and ``w.T`` when ``w`` is the transpose of a contiguous
    ``(K, C)`` tensor (``nn.Linear.weight.t()``), else "rows" and ``w`` contiguous."""
    if w.dim() == 2 and w.stride(0) == 1 and w.stride(1) == w.shape[0] and w.shape[0] > 1:
        return "cols", w.t()
    return "rows", w.contiguous()


class _Groups:
    """The (row, block) pairs of ``active (N, A)`` grouped by block, on the host and,
    for CUDA tensors, on the device."""

    def __init__(self, active: torch.Tensor):
        host = active.detach().to("cpu", torch.int64).numpy()
        from .kernels.cpu.sampled import group_pairs

        self.n_rows, self.n_active = host.shape
        self.pairs, self.group_ptr, self.group_block = group_pairs(host)
        self.device = active.device
        self._tables = None

    def tables(self):
        """pairs, group_ptr and group_block as tensors on the device (made once)."""
        if self._tables is None:
            self._tables = [torch.from_numpy(a).to(self.device)
                            for a in (self.pairs, self.group_ptr, self.group_block)]
        return self._tables


def _run(kind: str, order: str, first, second, groups: _Groups, out_groups, out, block: int) -> None:
    """One kernel launch on ``first``, ``second`` (2-D tensors) into ``out``."""
    if backend._on_cpu_kernels(first):
        from .kernels.cpu import sampled as cpu_sampled

        cpu_sampled.run(kind, order, first.numpy(), second.numpy(), groups.pairs, groups.group_ptr,
                        out_groups, out.numpy(), groups.n_active, block)
        return
    kernels, target = backend._kernels("sampled", first.device, first.dtype)
    pairs, group_ptr, group_block = groups.tables()
    outs = torch.from_numpy(out_groups).to(first.device) if out_groups is not groups.group_block else group_block
    with backend._Launch(target, first.device) as launch:
        kernels.launch(kind, order, launch.array(first), launch.array(second), launch.array(pairs),
                       launch.array(group_ptr), launch.array(outs), launch.array(out), groups.n_active, block,
                       **backend._stream_kw(target, launch))


def sampled_forward(x, operand, order: str, groups: _Groups, block: int) -> torch.Tensor:
    """``y (N, A, B)`` on checked, contiguous arguments."""
    y = x.new_empty((groups.n_rows * groups.n_active, block))
    if y.numel():
        _run("forward", order, x, operand, groups, groups.group_block, y, block)
    return y.view(groups.n_rows, groups.n_active, block)


def sampled_data_grad(dy, operand, order: str, groups: _Groups, block: int, in_features: int) -> torch.Tensor:
    """``dx (N, C)``: per pair the product with the block's columns, summed over the row's pairs."""
    part = dy.new_empty((groups.n_rows * groups.n_active, in_features))
    if part.numel():
        _run("data", order, dy.reshape(-1, block), operand, groups, groups.group_block, part, block)
    return part.view(groups.n_rows, groups.n_active, in_features).sum(1)


def _weight_output(dy, groups: _Groups, block: int, shape, compact: bool, out):
    """``(dw, out_groups)``: the weight gradient's tensor and the output block of each
    group (see :func:`sampled_weight_grad`)."""
    if compact:
        rows = (groups.group_block.shape[0] * block, shape[1])
        dw = dy.new_empty(rows) if out is None else out.get(rows, dy)
        return dw, np.arange(groups.group_block.shape[0], dtype=np.int64)
    return dy.new_zeros(shape), groups.group_block


def sampled_weight_grad(x, dy, order: str, groups: _Groups, block: int, shape, compact: bool = False, out=None):
    """The weight gradient: dense in the weight's layout (zeros outside the chosen blocks:
    ``(K, C)`` for "cols", ``(C, K)`` for "rows"), or with ``compact`` (cols only) the
    chosen blocks' rows ``(U*B, C)`` in group order (``groups.group_block``), written
    into a tensor from ``out.get(shape, like)`` when ``out`` is given."""
    dw, out_groups = _weight_output(dy, groups, block, shape, compact, out)
    if dw.numel() and groups.group_block.size:
        _run("weight", order, x, dy.reshape(-1, block), groups, out_groups, dw, block)
    return dw


def sampled_backward(x, dy, operand, order: str, groups: _Groups, block: int, need_dx: bool, need_dw: bool,
                     compact: bool = False, out=None):
    """``(dx or None, dw or None)`` (as :func:`sampled_data_grad` and
    :func:`sampled_weight_grad`); on CPUs, with both asked for and the cols order, one
    sweep over the chosen blocks computes both."""
    if not (need_dx and need_dw and order == "cols" and backend._on_cpu_kernels(x) and groups.group_block.size):
        dx = sampled_data_grad(dy, operand, order, groups, block, x.shape[1]) if need_dx else None
        dw = sampled_weight_grad(x, dy, order, groups, block, operand.shape, compact, out) if need_dw else None
        return dx, dw
    from .kernels.cpu import sampled as cpu_sampled

    part = dy.new_empty((groups.n_rows * groups.n_active, x.shape[1]))
    dw, out_groups = _weight_output(dy, groups, block, operand.shape, compact, out)
    cpu_sampled.run_backward(x.numpy(), dy.reshape(-1, block).numpy(), operand.numpy(), groups.pairs,
                             groups.group_ptr, groups.group_block, out_groups, part.numpy(), dw.numpy(),
                             groups.n_active, block)
    return part.view(groups.n_rows, groups.n_active, x.shape[1]).sum(1), dw


class _SampledMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, groups, order, block):
        operand = w.t() if order == "cols" else w
        ctx.save_for_backward(x, operand)
        ctx.groups, ctx.order, ctx.block = groups, order, block
        return sampled_forward(x, operand, order, groups, block)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, operand = ctx.saved_tensors
        dy = dy.contiguous()
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = sampled_backward(x, dy, operand, ctx.order, ctx.groups, ctx.block, need_dx, need_dw)
        if dw is not None and ctx.order == "cols":
            dw = dw.t()
        return dx, dw, None, None, None


def check_active(active, n_rows: int, n_blocks: int, device) -> torch.Tensor:
    """``active`` as an int64 ``(N, A)`` tensor of block ids in ``[0, n_blocks)``, or a clear error."""
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be a torch.Tensor of block ids, got {type(active).__name__}")
    if active.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"active must hold integer block ids, got dtype {active.dtype}")
    if active.dim() != 2 or active.shape[0] != n_rows:
        raise ValueError(f"active must have shape (N, A) = ({n_rows}, A), got {tuple(active.shape)}")
    if active.device != device:
        raise ValueError(f"active is on {active.device} but x is on {device}: move both to one device")
    if active.numel():
        low, high = int(active.min()), int(active.max())
        if low < 0 or high >= n_blocks:
            raise ValueError(f"active holds block ids in [{low}, {high}] but w has {n_blocks} column blocks: "
                             f"ids must lie in [0, {n_blocks})")
    return active.to(torch.int64)


def sampled_matmul(x: torch.Tensor, w: torch.Tensor, active: torch.Tensor, block_size: int) -> torch.Tensor:
    """The products of each row of ``x`` with a few column blocks of ``w``.

    Args:
        x: ``(N, C)`` float32 or float64.
        w: ``(C, K)`` dense weight of ``x``'s dtype and device, ``K`` a multiple of
            ``block_size`` (``nn.Linear.weight.t()``, a transposed view, is read in place).
        active: ``(N, A)`` integer ids of the column blocks to compute per row, in
            ``[0, K / block_size)``; ids may repeat.
        block_size: B in {8, 16, 32}.

    Returns:
        ``(N, A, B)``: ``y[n, k, :] = x[n] @ w[:, a*B:(a+1)*B]`` with ``a = active[n, k]``.
        Gradients for ``x`` and ``w``; ``w``'s is zero outside the chosen columns.
    """
    block = check_block_size(block_size)
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; sampled_matmul supports float32 and float64")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if x.dtype != w.dtype or x.device != w.device:
        raise TypeError(f"x is {x.dtype} on {x.device} but w is {w.dtype} on {w.device}: use one dtype and device")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but w has {w.shape[0]} rows: w must be (C, K) with C = "
                         f"x.shape[1]")
    if w.shape[1] % block:
        raise ValueError(f"w has {w.shape[1]} columns, not a multiple of block_size {block}")
    active = check_active(active, x.shape[0], w.shape[1] // block, x.device)
    order, _ = _order(w)
    if order == "rows":
        w = w.contiguous()
    groups = _Groups(active)
    x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _SampledMatmul.apply(x, w, groups, order, block)
    return sampled_forward(x, w.t() if order == "cols" else w, order, groups, block)
