"""``torch.nn`` LSTM with a block-sparse recurrent weight: :class:`BlockSparseLSTM`."""
from __future__ import annotations

import torch
from torch import nn

from . import layouts
from ._checks import as_layout, autocast_input, check_block_size, check_tensor
from .functional_lstm import check_state
from .layout import BlockLayout
from .lstm_ops import lstm_apply
from .nn import BlockSparseLinear, dense_to_blocks

__all__ = ["BlockSparseLSTM"]


class BlockSparseLSTM(nn.Module):
    """A single-layer LSTM whose fused recurrent weight is block-sparse.

    Called like ``torch.nn.LSTM``: ``output, (h_n, c_n) = lstm(input, (h_0, c_0))``,
    zero states when ``(h_0, c_0)`` is omitted.  The input projection of all time steps
    is one call before the recurrence (dense ``nn.Linear``, or block-sparse when
    ``input_layout`` is given); each step is then one block-sparse matmul
    ``h @ W_hh`` plus the cell's elementwise work, and the backward pass computes the
    recurrent weight gradient of all steps in one call.

    Args:
        input_size: features of the input.
        hidden_size: H, a multiple of ``block_size``.
        layout: :class:`BlockLayout` or 0/1 block mask of the fused recurrent weight,
            shape ``(H/B, 4H/B)``; column blocks ``[0, H/B)`` feed the input gate, then
            the forget gate, the cell candidate and the output gate (``nn.LSTM``'s order).
            :func:`numbasparse.layouts.lstm_gates` builds one from an ``(H/B, H/B)``
            layout (e.g. a small-world graph over the hidden blocks).
        block_size: B in {8, 16, 32}.
        batch_first: input and output are ``(N, T, features)`` instead of ``(T, N, features)``.
        bias: learn a bias ``(4H,)`` (``nn.LSTM``'s ``b_ih + b_hh`` as one vector, kept in
            the input projection).
        input_layout: optional block layout ``(input_size/B, 4H/B)`` of the input
            projection; None keeps it dense.

    Attributes:
        recurrent: :class:`BlockSparseLinear` ``(H -> 4H, no bias)`` holding the recurrent
            blocks (``recurrent.weight``, ``(capacity, B, B)``) and ``layout``.
        input_projection: ``nn.Linear(input_size, 4H)`` or :class:`BlockSparseLinear`.

    Shapes: input ``(T, N, input_size)`` (or ``(N, T, ...)`` with ``batch_first``, or an
    unbatched ``(T, input_size)``); ``h_0``, ``c_0`` ``(1, N, H)`` (``(1, H)`` unbatched),
    as for a one-layer ``nn.LSTM``.  Returns ``output (T, N, H)`` and ``h_n``, ``c_n``
    shaped like ``h_0``.  The layout is read once per call: a call runs its whole
    sequence, and its backward pass, with the layout it started with.
    """

    def __init__(self, input_size: int, hidden_size: int, layout, block_size: int = 32, batch_first: bool = False,
                 bias: bool = True, input_layout=None, device=None, dtype=None):
        super().__init__()
        block_size = check_block_size(block_size)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden_size % block_size:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of block_size {block_size}")
        layout = as_layout(layout)
        expected = (hidden_size // block_size, 4 * hidden_size // block_size)
        if layout.shape != expected:
            raise ValueError(f"layout must have shape (H/B, 4H/B) = {expected} for hidden_size {hidden_size} and "
                             f"block_size {block_size}, got {layout.shape}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.block_size = block_size
        self.batch_first = bool(batch_first)
        factory = {"device": device, "dtype": dtype}
        self.recurrent = self._make_recurrent(hidden_size, layout, block_size, factory)
        if input_layout is None:
            self.input_projection = nn.Linear(input_size, 4 * hidden_size, bias=bias, **factory)
        else:
            self.input_projection = BlockSparseLinear(input_size, 4 * hidden_size, input_layout, block_size,
                                                      bias=bias, **factory)

    def _make_recurrent(self, hidden_size, layout, block_size, factory) -> nn.Module:
        return BlockSparseLinear(hidden_size, 4 * hidden_size, layout, block_size, bias=False, **factory)

    def _recurrent_operands(self):
        """``(w, layout tensor)`` for the recurrence operator."""
        return autocast_input(self.recurrent.weight), self.recurrent.kernel_layout

    # ------------------------------------------------------------ layout
    @property
    def layout(self) -> BlockLayout:
        """The recurrent layout ``(H/B, 4H/B)`` (``recurrent.layout``)."""
        return self.recurrent.layout

    @property
    def bias(self) -> torch.Tensor | None:
        return self.input_projection.bias

    # ------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor, hx: tuple | None = None):
        check_tensor("input", input)
        if input.dim() not in (2, 3):
            raise ValueError(f"input must be 3-D {'(N, T, features)' if self.batch_first else '(T, N, features)'} "
                             f"or 2-D (T, features), got shape {tuple(input.shape)}")
        batched = input.dim() == 3
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input has {input.shape[-1]} features (shape {tuple(input.shape)}) but the layer "
                             f"takes input_size={self.input_size}")
        weight = self.recurrent.weight
        if autocast_input(input).dtype != autocast_input(weight).dtype or input.device != weight.device:
            raise TypeError(f"input is {input.dtype} on {input.device} but the layer's weights are {weight.dtype} on "
                            f"{weight.device}: use one dtype and device (input.to(...) or lstm.to(...))")
        x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
        if not batched:
            x = x.unsqueeze(1)
        gx = self.input_projection(x).contiguous()   # (T, N, 4H)
        w, layout_t = self._recurrent_operands()
        if gx.dtype != w.dtype:
            raise TypeError(f"the input projection gives {gx.dtype} but the recurrent weight is {w.dtype}: "
                            "use one dtype for the whole layer")
        h0, c0 = self._initial_state(hx, gx, batched)
        hs, cs, _ = lstm_apply(gx, w, layout_t, self.block_size, h0, c0)
        self._after_recurrence(hs, gx)
        output = hs[1:]
        if not batched:
            return output.squeeze(1), (hs[-1], cs[-1])
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hs[-1].unsqueeze(0), cs[-1].unsqueeze(0))

    def _after_recurrence(self, hs: torch.Tensor, gx: torch.Tensor) -> None:
        """Hook for subclasses: the states ``hs (T+1, N, H)`` and the recurrence's input ``gx``."""

    def _initial_state(self, hx, gx: torch.Tensor, batched: bool):
        rows, hidden = gx.shape[1], self.hidden_size
        if hx is None:
            zeros = gx.new_zeros((rows, hidden))
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        expected = (1, rows, hidden) if batched else (1, hidden)
        states = []
        for name, state in zip(("h_0", "c_0"), hx):
            check_tensor(name, state)
            if tuple(state.shape) != expected:
                raise ValueError(f"{name} must have shape (num_layers=1, N, H) = {expected}, got "
                                 f"{tuple(state.shape)}" if batched else
                                 f"{name} must have shape (1, H) = {expected} for an unbatched input, got "
                                 f"{tuple(state.shape)}")
            state = autocast_input(state).reshape(rows, hidden)
            check_state(name, state, gx, hidden)
            states.append(state.contiguous())
        return tuple(states)

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_dense(cls, lstm: nn.LSTM, block_size: int = 32, density: float | None = None,
                   threshold: float | None = None) -> "BlockSparseLSTM":
        """A :class:`BlockSparseLSTM` from a trained one-layer ``nn.LSTM``: keeps the blocks
        of ``weight_hh_l0.T`` with the largest norm (:func:`numbasparse.layouts.from_dense`;
        ``density=None`` and no threshold keep every block: the same function as ``lstm``),
        copies the input weight into a dense input projection and ``b_ih + b_hh`` into its
        bias."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_dense expects an nn.LSTM, got {type(lstm).__name__}")
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
            raise ValueError("from_dense converts a one-layer, unidirectional nn.LSTM without proj_size; got "
                             f"num_layers={lstm.num_layers}, bidirectional={lstm.bidirectional}, "
                             f"proj_size={lstm.proj_size}")
        block_size = check_block_size(block_size)
        if lstm.hidden_size % block_size:
            raise ValueError(f"hidden_size={lstm.hidden_size} is not a multiple of block_size {block_size}")
        w_hh = lstm.weight_hh_l0.detach().t()                 # (H, 4H): h @ w_hh
        if density is None and threshold is None:
            layout = layouts.dense(*(s // block_size for s in w_hh.shape))
        else:
            layout = layouts.from_dense(w_hh, block_size, density=density, threshold=threshold)
        module = cls(lstm.input_size, lstm.hidden_size, layout, block_size, batch_first=lstm.batch_first,
                     bias=lstm.bias, device=w_hh.device, dtype=w_hh.dtype)
        with torch.no_grad():
            module.recurrent.weight.copy_(dense_to_blocks(w_hh, layout, block_size))
            module.input_projection.weight.copy_(lstm.weight_ih_l0)
            if lstm.bias:
                module.input_projection.bias.copy_(lstm.bias_ih_l0 + lstm.bias_hh_l0)
        return module

    def extra_repr(self) -> str:
        layout = self.layout
        return (f"{self.input_size}, {self.hidden_size}, block_size={self.block_size}, nnz={layout.nnz}, "
                f"density={layout.density:.3f}, batch_first={self.batch_first}")
