"""An LSTM whose recurrent blocks are gated: :class:`L0BlockSparseLSTM`."""
from __future__ import annotations

import torch

from numbasparse.nn_lstm import BlockSparseLSTM

from .layers import L0BlockSparseLinear

__all__ = ["L0BlockSparseLSTM"]


class L0BlockSparseLSTM(BlockSparseLSTM):
    """A :class:`~numbasparse.BlockSparseLSTM` whose recurrent blocks are scaled by
    hard-concrete L0 gates, so that :class:`~learn.DynamicSparsity` (or
    :class:`~learn.GradualPruning`) can learn which hidden blocks talk to which.

    Args: as :class:`~numbasparse.BlockSparseLSTM` (``layout`` may be None: every block
    live), plus the gate settings ``init_keep``, ``beta``, ``gamma``, ``zeta``, ``seed``
    (:class:`~learn.HardConcreteGate`).

    Attributes:
        recurrent: an :class:`~learn.L0BlockSparseLinear` ``(H -> 4H, no bias)``: its
            ``weight``, ``gate`` and ``layout`` are the recurrent weight's.  In training
            mode one gate sample per forward call is shared by every time step and row.
        input_projection: dense or block-sparse (not gated), as in the parent class.

    The L0 penalty (:func:`~learn.l0_penalty`) counts the recurrent blocks; regrowth
    by gradient (``DynamicSparsity(regrow=...)``) sees the recurrent weight's dense
    gradient over the last batch's steps.
    """

    def __init__(self, input_size: int, hidden_size: int, layout=None, block_size: int = 32,
                 batch_first: bool = False, bias: bool = True, input_layout=None, init_keep: float = 0.9,
                 beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1, seed: int | None = None,
                 device=None, dtype=None):
        self._gate_settings = {"init_keep": init_keep, "beta": beta, "gamma": gamma, "zeta": zeta, "seed": seed}
        if layout is None:
            from numbasparse import layouts

            if isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0 \
                    and isinstance(hidden_size, int) and hidden_size % block_size == 0:
                layout = layouts.dense(hidden_size // block_size, 4 * hidden_size // block_size)
            else:   # the parent's checks name the problem
                layout = [[1]]
        super().__init__(input_size, hidden_size, layout, block_size, batch_first=batch_first, bias=bias,
                         input_layout=input_layout, device=device, dtype=dtype)

    def _make_recurrent(self, hidden_size, layout, block_size, factory):
        return L0BlockSparseLinear(hidden_size, 4 * hidden_size, layout, block_size, bias=False,
                                   **self._gate_settings, **factory)

    def _recurrent_operands(self):
        return self.recurrent._kernel_operands()

    def _after_recurrence(self, hs: torch.Tensor, gx: torch.Tensor) -> None:
        # the recurrent matmul's input is every step's h_prev, its output gradient gx's
        self.recurrent._maybe_capture(hs[:-1], gx)
