"""The LSTM recurrence as PyTorch operators: ``torch.ops.numbasparse.lstm`` and
``lstm_backward``, with fake (shape-only) implementations, an autograd formula and
autocast rules as for :mod:`numbasparse.ops`; plus the eager fast path (a classic
``torch.autograd.Function``) used when nothing but eager autograd is watching.

* ``lstm(gx (T, N, 4H), w (capacity, B, B), layout, block_size, h0 (N, H), c0 (N, H))
  -> (hs (T+1, N, H), cs (T+1, N, H), gates (T, N, 4H))`` with ``hs[0] = h0``,
  ``cs[0] = c0``; ``gates`` holds the activated gates for the backward pass and has no
  gradient.
* ``lstm_backward(dhs, dcs, w, layout, block_size, hs, cs, gates, need_w)
  -> (dgx, dw, dh0, dc0)``; ``dw`` is empty when not asked for.

They check nothing: :func:`numbasparse.functional.block_sparse_lstm` and
:class:`numbasparse.BlockSparseLSTM` check the arguments.  The loops are in
:mod:`numbasparse.recurrence`.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import eager, ops, recurrence
from .layout_tensor import layout_of

__all__ = ["lstm", "lstm_apply"]

_lib = torch.library.Library("numbasparse", "FRAGMENT")
_lib.define("lstm(Tensor gx, Tensor w, Tensor layout, int block_size, Tensor h0, Tensor c0) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("lstm_backward(Tensor? dhs, Tensor? dcs, Tensor w, Tensor layout, int block_size, Tensor hs, "
            "Tensor cs, Tensor gates, bool need_w) -> (Tensor, Tensor, Tensor, Tensor)")


def _lstm(gx, w, layout, block_size, h0, c0):
    return recurrence.lstm_forward(gx, w, layout_of(layout), block_size, h0, c0)


def _lstm_backward(dhs, dcs, w, layout, block_size, hs, cs, gates, need_w):
    dgx, dw, dh0, dc0 = recurrence.lstm_backward(dhs, dcs, w, layout_of(layout), block_size, hs, cs, gates,
                                                 need_w)
    return dgx, (dw if need_w else w.new_empty(0)), dh0, dc0


for _key in ("CPU", "CUDA"):
    _lib.impl("lstm", _lstm, _key)
    _lib.impl("lstm_backward", _lstm_backward, _key)


@torch.library.register_fake("numbasparse::lstm")
def _lstm_fake(gx, w, layout, block_size, h0, c0):
    steps, rows, four_h = gx.shape
    states = gx.new_empty((steps + 1, rows, four_h // 4))
    return states, torch.empty_like(states), torch.empty_like(gx)


@torch.library.register_fake("numbasparse::lstm_backward")
def _lstm_backward_fake(dhs, dcs, w, layout, block_size, hs, cs, gates, need_w):
    return (torch.empty_like(gates), torch.empty_like(w) if need_w else w.new_empty(0),
            torch.empty_like(hs[0]), torch.empty_like(cs[0]))


def _setup(ctx, inputs, output):
    _, w, layout, block_size, _, _ = inputs
    hs, cs, gates = output
    ctx.save_for_backward(w, layout, hs, cs, gates)
    ctx.block_size = block_size
    ctx.mark_non_differentiable(gates)


def _gradients(ctx, dhs, dcs, backward):
    """The inputs' gradients from the saved outputs, ``backward`` being the backward
    operator or, on the eager path, its implementation (same arguments)."""
    w, layout, hs, cs, gates = ctx.saved_tensors
    need_gx, need_w, _, _, need_h0, need_c0 = ctx.needs_input_grad
    if not (need_gx or need_w or need_h0 or need_c0):
        return None, None, None, None, None, None
    dgx, dw, dh0, dc0 = backward(None if dhs is None else dhs.contiguous(), None if dcs is None else dcs.contiguous(),
                                 w, layout, ctx.block_size, hs, cs, gates, need_w)
    return (dgx if need_gx else None, dw if need_w else None, None, None,
            dh0 if need_h0 else None, dc0 if need_c0 else None)


def _grad(ctx, dhs, dcs, _dgates):
    return _gradients(ctx, dhs, dcs, torch.ops.numbasparse.lstm_backward)


torch.library.register_autograd("numbasparse::lstm", _grad, setup_context=_setup)
for _device in ("cpu", "cuda"):
    ops._register_autocast("lstm", _device)


class _EagerLstm(torch.autograd.Function):
    """The operator pair on the eager fast path (same functions, no dispatcher layers)."""

    @staticmethod
    def forward(ctx, gx, w, layout, block_size, h0, c0):
        outputs = _lstm(gx, w, layout, block_size, h0, c0)
        _setup(ctx, (gx, w, layout, block_size, h0, c0), outputs)
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs, dcs, _dgates):
        return _gradients(ctx, dhs, dcs, _lstm_backward)


def lstm_apply(gx, w, layout_t, block_size: int, h0, c0):
    """``(hs, cs, gates)`` of the operator on checked, contiguous arguments, on the eager
    fast path when it is allowed."""
    if eager.eager_allowed(gx, w, h0) and type(c0) in eager._PLAIN:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (gx, w, h0, c0)):
            return _EagerLstm.apply(gx, w, layout_t, block_size, h0, c0)
        return _lstm(gx, w, layout_t, block_size, h0, c0)
    return lstm(gx, w, layout_t, block_size, h0, c0)


lstm = torch.ops.numbasparse.lstm.default
