"""The LSTM recurrence over a whole sequence, forward and backward: the time loops
behind ``torch.ops.numbasparse.lstm`` (:mod:`numbasparse.lstm_ops`).

Shapes (``T`` steps, ``N`` rows, ``H`` hidden units, gates ordered ``[i | f | g | o]``
as in ``torch.nn.LSTM``)::

    gx     (T, N, 4H)   input projection of every step, bias included
    w      (capacity, B, B) recurrent blocks; layout (H/B, 4H/B): h (N, H) @ W -> (N, 4H)
    hs, cs (T+1, N, H)  hidden and cell states, hs[0] = h0 and cs[0] = c0
    gates  (T, N, 4H)   activated gates, kept for the backward pass

A forward step is one block-sparse matmul ``h @ W`` written into ``gates[t]`` plus the
cell's elementwise work (one numba loop on CPUs for float32, in-place torch ops
otherwise); a backward step is the cell's elementwise backward (one numba loop on CPUs
for float32 and float64) plus one block-sparse data-gradient matmul.  The weight gradient
of all steps is one call over the ``T*N`` rows at the end.  On CPUs in float32 nothing
is allocated inside the loops (the torch-op paths allocate temporaries).
"""
from __future__ import annotations

import torch

from . import backend
from .kernels.cpu import lstm_cell, runtime
from .kernels.cpu import matmul as cpu_matmul
from .layout import BlockLayout

__all__ = ["lstm_forward", "lstm_backward"]

_NUMBA_CELL = (torch.float32, torch.float64)


def _matmul_into(x: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int, out: torch.Tensor):
    """``out (N, K) = x (N, C) @ W`` (all contiguous)."""
    if backend._on_cpu_kernels(x):
        cpu_matmul._layout_forward(x, w, layout, block_size, out, backend._DTYPE_NAMES[x.dtype], x.element_size())
    else:
        out.copy_(backend._forward(x, w, layout, block_size))


def _data_grad_into(dy: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int, out: torch.Tensor):
    """``out (N, C) = dy (N, K) @ W^T`` (all contiguous)."""
    if backend._on_cpu_kernels(dy):
        cpu_matmul._layout_backward(None, dy, w, layout, block_size, out, None, backend._DTYPE_NAMES[dy.dtype],
                                    dy.element_size())
    else:
        out.copy_(backend._backward(dy, None, w, layout, block_size, True, False)[0])


def lstm_forward(gx: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int,
                 h0: torch.Tensor, c0: torch.Tensor):
    """Runs the sequence: returns ``(hs, cs, gates)`` (shapes in the module docstring)."""
    steps, rows, four_h = gx.shape
    hidden = four_h // 4
    hs = gx.new_empty((steps + 1, rows, hidden))
    cs = gx.new_empty((steps + 1, rows, hidden))
    gates = torch.empty_like(gx)
    hs[0].copy_(h0)
    cs[0].copy_(c0)
    numba_cell = backend._on_cpu_kernels(gx) and gx.dtype == torch.float32
    threads = _cell_threads(rows, hidden, gx.element_size())
    for t in range(steps):
        g = gates[t]
        _matmul_into(hs[t], w, layout, block_size, g)
        if numba_cell:
            lstm_cell.run("cell_forward", (g.numpy(), gx[t].numpy(), cs[t].numpy(), cs[t + 1].numpy(),
                                           hs[t + 1].numpy()), threads)
        else:
            _cell_forward_torch(g, gx[t], cs[t], cs[t + 1], hs[t + 1])
    return hs, cs, gates


def _cell_forward_torch(g, gx, c_prev, c, h):
    """:func:`~numbasparse.kernels.cpu.lstm_cell.cell_forward` in torch ops (float64,
    CUDA and the 16-bit dtypes)."""
    hidden = c.shape[1]
    g.add_(gx)
    g[:, :2 * hidden].sigmoid_()
    g[:, 2 * hidden:3 * hidden].tanh_()
    g[:, 3 * hidden:].sigmoid_()
    torch.mul(g[:, hidden:2 * hidden], c_prev, out=c)
    c.addcmul_(g[:, :hidden], g[:, 2 * hidden:3 * hidden])
    torch.tanh(c, out=h)
    h.mul_(g[:, 3 * hidden:])


def _cell_backward_torch(gates, c_prev, tanh_c, dh, dc, dgates):
    """:func:`~numbasparse.kernels.cpu.lstm_cell.cell_backward` in torch ops (CUDA and
    the 16-bit dtypes; computed in float32 at least)."""
    compute = torch.promote_types(gates.dtype, torch.float32)
    i, f, g, o = gates.to(compute).chunk(4, dim=1)
    t = tanh_c.to(compute)
    d_h = dh.to(compute)
    d_c = dc.to(compute) + d_h * o * (1 - t * t)
    dgates.copy_(torch.cat([d_c * g * i * (1 - i), d_c * c_prev.to(compute) * f * (1 - f),
                            d_c * i * (1 - g * g), d_h * t * o * (1 - o)], dim=1))
    dc.copy_(d_c * f)


def _cell_threads(rows: int, hidden: int, itemsize: int) -> int:
    """Threads for one cell step: about 40 operations and 11 values moved per hidden unit
    and row (memory-bound: two threads pay off from a few thousand units)."""
    return min(rows, runtime.threads_for(40.0 * rows * hidden, 11.0 * rows * hidden * itemsize))


def lstm_backward(dhs: torch.Tensor | None, dcs: torch.Tensor | None, w: torch.Tensor, layout: BlockLayout,
                  block_size: int, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor, need_w: bool):
    """Gradients ``(dgx (T, N, 4H), dw (capacity, B, B) or None, dh0 (N, H), dc0 (N, H))``
    from the gradients of ``hs`` and ``cs`` (``(T+1, N, H)`` each, or None for zero)."""
    steps, rows, four_h = gates.shape
    hidden = four_h // 4
    dgx = torch.empty_like(gates)
    dh = dhs[steps].clone() if dhs is not None else hs.new_zeros((rows, hidden))
    dc = dcs[steps].clone() if dcs is not None else hs.new_zeros((rows, hidden))
    numba_cell = backend._on_cpu_kernels(gates) and gates.dtype in _NUMBA_CELL
    threads = _cell_threads(rows, hidden, gates.element_size())
    for t in range(steps - 1, -1, -1):
        if numba_cell:
            lstm_cell.run("cell_backward", (gates[t].numpy(), cs[t].numpy(), dh.numpy(), dc.numpy(),
                                            dgx[t].numpy()), threads)
        else:
            _cell_backward_torch(gates[t], cs[t], torch.tanh(cs[t + 1]), dh, dc, dgx[t])
        _data_grad_into(dgx[t], w, layout, block_size, dh)
        if dhs is not None:
            dh.add_(dhs[t])
        if dcs is not None:
            dc.add_(dcs[t])
    dw = None
    if need_w:
        dw = backend._backward(dgx.reshape(steps * rows, four_h), hs[:-1].reshape(steps * rows, hidden), w, layout,
                               block_size, False, True)[1]
    return dgx, dw, dh, dc
