"""Functional LSTM recurrence with a block-sparse recurrent weight:
:func:`block_sparse_lstm` (re-exported by :mod:`numbasparse.functional`)."""
from __future__ import annotations

import torch

from ._checks import as_layout, block_size_of, check_tensor, check_weight_shape
from .layout import BlockLayout
from .layout_tensor import layout_tensor
from .lstm_ops import lstm_apply

__all__ = ["block_sparse_lstm", "check_lstm_layout"]


def check_lstm_layout(layout: BlockLayout, block_size: int, what: str = "layout") -> int:
    """The hidden size of a fused recurrent layout ``(H/B, 4H/B)``, or ValueError."""
    if layout.out_blocks != 4 * layout.in_blocks:
        raise ValueError(f"the recurrent {what} must have shape (H/B, 4H/B) = (hidden blocks, 4 * hidden blocks) "
                         f"for the gates [i | f | g | o], got {layout.shape}")
    return layout.in_blocks * block_size


def check_state(name: str, state, gx: torch.Tensor, hidden: int) -> None:
    check_tensor(name, state)
    expected = (gx.shape[1], hidden)
    if tuple(state.shape) != expected:
        raise ValueError(f"{name} must have shape (N, H) = {expected}, got {tuple(state.shape)}")
    if state.dtype != gx.dtype or state.device != gx.device:
        raise TypeError(f"{name} is {state.dtype} on {state.device} but gx is {gx.dtype} on {gx.device}: "
                        "use one dtype and device")


def block_sparse_lstm(gx: torch.Tensor, w: torch.Tensor, layout, h0: torch.Tensor | None = None,
                      c0: torch.Tensor | None = None, block_size: int | None = None):
    """The LSTM recurrence over a sequence with a block-sparse fused recurrent weight.

    Each step: ``gates = gx[t] + h @ W`` (``W``: ``(H, 4H)``, block-sparse), then
    ``i, f, g, o = sigmoid, sigmoid, tanh, sigmoid`` of the four ``H``-wide column
    ranges, ``c = f * c + i * g``, ``h = o * tanh(c)`` - the gate order and formulas of
    ``torch.nn.LSTM``.

    Args:
        gx: ``(T, N, 4H)`` input projection of every step, bias included (time-major).
        w: ``(layout.capacity, B, B)`` recurrent blocks.
        layout: :class:`BlockLayout` or 0/1 block mask of shape ``(H/B, 4H/B)``.
        h0, c0: ``(N, H)`` initial states; zeros when None.
        block_size: B in {8, 16, 32}; defaults to ``w.shape[-1]``.

    Returns:
        ``(output (T, N, H), (h_n (N, H), c_n (N, H)))`` with gradients for ``gx``,
        ``w``, ``h0`` and ``c0``.  The layout is read once: the whole sequence, and its
        backward pass, use the layout of the call.
    """
    layout = as_layout(layout)
    check_tensor("gx", gx)
    check_tensor("w", w)
    block_size = block_size_of(block_size, w)
    check_weight_shape(w, layout, block_size)
    hidden = check_lstm_layout(layout, block_size)
    if gx.dim() != 3 or gx.shape[2] != 4 * hidden:
        raise ValueError(f"gx must have shape (T, N, 4H) = (T, N, {4 * hidden}) for this layout, "
                         f"got {tuple(gx.shape)}")
    if gx.device != w.device or gx.dtype != w.dtype:
        raise TypeError(f"gx is {gx.dtype} on {gx.device} but w is {w.dtype} on {w.device}: "
                        "use one dtype and device")
    h0 = gx.new_zeros((gx.shape[1], hidden)) if h0 is None else h0
    c0 = gx.new_zeros((gx.shape[1], hidden)) if c0 is None else c0
    check_state("h0", h0, gx, hidden)
    check_state("c0", c0, gx, hidden)
    hs, cs, _ = lstm_apply(gx.contiguous(), w.contiguous(), layout_tensor(layout, gx.device), block_size,
                           h0.contiguous(), c0.contiguous())
    return hs[1:], (hs[-1], cs[-1])
