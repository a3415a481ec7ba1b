"""GradualPruning: gradual magnitude pruning of block-sparse layers (Zhu & Gupta, 2017),
removing the pruned blocks from the layouts so compute drops as the model is pruned.

Typical loop (a dense model converted with :func:`numbasparse.sparsify` at density 1.0,
fine-tuned while it is pruned to 10% of its blocks between steps 200 and 2,000)::

    model = numbasparse.sparsify(dense_model, density=1.0, block_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruning = learn.GradualPruning(model, opt, final_density=0.1, start_step=200, end_step=2000)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        report = pruning.step()        # a SparsityReport on pruning steps, else None

**Schedule.**  The density after training step ``t`` is, with ``d_i`` the initial and
``d_f`` the final density and ``t0, t1`` the start and end steps,
``d(t) = d_f + (d_i - d_f) * (1 - clamp((t - t0) / (t1 - t0), 0, 1)) ** 3`` - fast at
first, while many redundant blocks remain, then slower.  Pruning steps are
``t0, t0 + every, ...`` up to ``t1``, and ``t1`` itself.

**What a pruning step does.**  Per layer (``scope="layer"``, the default) each layer is
brought to ``ceil(d(t) * its block positions)`` live blocks, removing its live blocks of
smallest Frobenius norm; with ``scope="global"`` the whole model is brought to
``ceil(d(t) * all positions)`` live blocks, removing the blocks of smallest RMS value
(norm over the square root of the block's entries, so linear and conv blocks compare)
wherever they are.  Ties go to the later position; every layer keeps at least one
block; a layer already below the schedule loses nothing.  Removed blocks leave the
layout (the kernels stop computing them), their weights are zeroed, their optimizer
state is reset to what the optimizer gives a fresh parameter, and the gates of a gated
layer are closed for good - exactly as :class:`~learn.DynamicSparsity` does.  Decisions
depend only on the weights, which data-parallel ranks share, so every rank decides
alike.

**With DynamicSparsity.**  Both controllers rewrite the layouts of the layers they
manage, so they should not manage the same layers at the same time: a
``DynamicSparsity`` with regrowth would refill what the pruning removes, and one without
regrowth removes blocks the schedule does not count.  Prune first, then (after
``end_step``) hand the layers to ``DynamicSparsity(model, opt, regrow="gradient")``,
which keeps the density it finds and moves blocks RigL-style; for gated layers the
same cubic schedule is built into ``DynamicSparsity(target_density=...)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from numbasparse._interrupts import deferred_interrupts
from numbasparse.optim_state import as_optimizers

from .reports import LayerReport, SparsityReport
from .schedule import check_fraction, check_int, cubic_density
from .slots import block_sparse_layers, install_layout, live_block_norms

__all__ = ["GradualPruning"]

_SCOPES = ("layer", "global")


class GradualPruning:
    """Prunes the block-sparse layers of ``model`` by block magnitude on a cubic schedule
    (see the module docstring).  Call :meth:`step` once per training step, after
    ``optimizer.step()``.

    Args:
        model: module (or DDP wrapper) containing block-sparse layers
            (``BlockSparseLinear``, ``BlockSparseConv2d``, the gated layers).
        optimizer: the ``torch.optim.Optimizer`` training the model, a list or tuple of
            them, or None (its per-slot state is reset for pruned blocks).
        final_density: density ``d_f`` in (0, 1] the layers reach at ``end_step``.
        start_step, end_step: the schedule runs from after step ``start_step`` (int >= 0)
            to after step ``end_step`` (>= ``start_step``; equal: one-shot pruning).
        every: steps between pruning steps (int >= 1).
        initial_density: density ``d_i`` in [``final_density``, 1] the schedule starts
            from (1.0: all block positions).
        scope: ``"layer"`` (each layer follows the schedule) or ``"global"`` (the model
            as a whole does; smallest-RMS blocks go wherever they are).

    Attributes:
        history: list of :class:`~learn.SparsityReport`, one per pruning step.
        steps: training steps counted so far; ``updates``: pruning steps done so far.
    """

    def __init__(self, model: nn.Module, optimizer, final_density: float, start_step: int, end_step: int,
                 every: int = 100, initial_density: float = 1.0, scope: str = "layer"):
        self.final_density = check_fraction(final_density, "final_density")
        self.initial_density = check_fraction(initial_density, "initial_density")
        if self.initial_density < self.final_density:
            raise ValueError(f"initial_density ({initial_density}) must be >= final_density ({final_density})")
        self.start_step = check_int(start_step, "start_step", 0)
        self.end_step = check_int(end_step, "end_step", self.start_step)
        self.every = check_int(every, "every", 1)
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        self.scope = scope
        self._optimizers = as_optimizers(optimizer)
        self.optimizer = optimizer
        self.model = model
        if not self.layers():
            raise ValueError(f"{type(model).__name__} has no block-sparse layers to prune "
                             "(convert nn.Linear / nn.Conv2d layers with numbasparse.sparsify first)")
        self.steps = 0
        self.updates = 0
        self.history: list = []

    # ------------------------------------------------------------ schedule
    def layers(self) -> list:
        """``[(name, layer), ...]`` of the block-sparse layers pruned."""
        return block_sparse_layers(self.model)

    def scheduled_density(self, step: int) -> float:
        """Density the schedule asks for after training step ``step``."""
        return cubic_density(step, self.initial_density, self.final_density, self.start_step, self.end_step)

    def is_update_step(self, step: int) -> bool:
        """Whether step ``step`` (1-based count of training steps) is a pruning step."""
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.every == 0

    def density(self) -> float:
        """Live fraction of all block positions of the pruned layers, now."""
        layers = self.layers()
        total = sum(layer.layout.in_blocks * layer.layout.out_blocks for _, layer in layers)
        return sum(layer.layout.nnz for _, layer in layers) / total

    # ------------------------------------------------------------ stepping
    def step(self) -> SparsityReport | None:
        """Count one training step; on pruning steps prune and return the report, else
        return None.  A ``KeyboardInterrupt`` leaves the model and the controller as
        before the call or as after it, never in between."""
        step = self.steps + 1
        if self.is_update_step(step):
            return self._update(step)
        self.steps = step
        return None

    @torch.no_grad()
    def _update(self, step: int) -> SparsityReport:
        layers = self.layers()
        density = self.scheduled_density(step)
        old = [layer.layout for _, layer in layers]
        keep = self._plan(layers, density)
        new = []
        for (_, layer), layout, drop in zip(layers, old, keep):
            rows, cols = layout.entry_rows[drop], layout.entry_cols[drop]
            new.append(layout.remove(rows, cols) if drop.size else layout)
        report = SparsityReport(step, self.updates + 1, scheduled=density)
        with deferred_interrupts():
            for (name, layer), before, after in zip(layers, old, new):
                removed, _ = install_layout(layer, before, after, self._optimizers)
                report.layers.append(LayerReport(name, after.nnz, after.in_blocks * after.out_blocks, removed))
            self.history.append(report)
            self.updates += 1
            self.steps = step
        return report

    def _plan(self, layers, density: float) -> list:
        """Per layer, the layout entries (indices) to remove."""
        norms, totals, live = [], [], []
        for name, layer in layers:
            norms.append(live_block_norms(name, layer))
            totals.append(layer.layout.in_blocks * layer.layout.out_blocks)
            live.append(layer.layout.nnz)
        if self.scope == "layer":
            drops = []
            for n, total, nnz in zip(norms, totals, live):
                goal = max(1, math.ceil(density * total - 1e-9))
                count = max(0, nnz - goal)
                drops.append(np.sort(_smallest(n, count)))
            return drops
        # global: smallest RMS anywhere, each layer keeping its largest block
        goal = max(len(layers), math.ceil(density * sum(totals) - 1e-9))
        count = max(0, sum(live) - goal)
        candidates = []   # (rms, -position, layer, entry)
        for li, ((_, layer), n) in enumerate(zip(layers, norms)):
            if n.size == 0:
                continue
            rms = n / math.sqrt(layer.weight[0].numel())
            best = int(_smallest(-n, 1)[0])
            positions = layer.layout.entry_rows * layer.layout.out_blocks + layer.layout.entry_cols
            candidates.extend((float(rms[e]), -int(positions[e]), li, e) for e in range(n.size) if e != best)
        candidates.sort()
        drops = [[] for _ in layers]
        for _, _, li, e in candidates[:count]:
            drops[li].append(e)
        return [np.sort(np.array(d, dtype=np.int64)) for d in drops]

    def compact(self) -> None:
        """Shrink every pruned layer's storage to its live blocks, in place, with the
        optimizer's per-slot state (see :meth:`numbasparse.nn.BlockStorage.compact`)."""
        with deferred_interrupts():
            for _, layer in self.layers():
                layer.compact(self._optimizers)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """Schedule position and history; layouts and weights are in the model's
        ``state_dict``, optimizer state in the optimizer's."""
        return {"steps": self.steps, "updates": self.updates, "history": [r.as_dict() for r in self.history],
                "config": {"final_density": self.final_density, "initial_density": self.initial_density,
                           "start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                           "scope": self.scope}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved.  The schedule given to the constructor
        must be the saved one (ValueError naming the difference otherwise); nothing
        changes when ``state`` is incomplete or does not match."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from GradualPruning.state_dict(), got {type(state).__name__}")
        config = state.get("config", {})
        mine = self.state_dict()["config"]
        for key, value in config.items():
            if key in mine and mine[key] != value:
                raise ValueError(f"checkpoint of a GradualPruning with {key}={value!r}, but this one has "
                                 f"{key}={mine[key]!r}: build it with the saved schedule")
        steps, updates = check_int(state["steps"], "steps", 0), check_int(state["updates"], "updates", 0)
        history = [SparsityReport.from_dict(d) for d in state.get("history", [])]
        self.steps, self.updates, self.history = steps, updates, history

    def __repr__(self):
        return (f"GradualPruning(final_density={self.final_density}, start_step={self.start_step}, "
                f"end_step={self.end_step}, every={self.every}, scope={self.scope!r}, steps={self.steps}, "
                f"density={self.density():.3f})")


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest ``values``; among equal values the later index
    goes first."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((-np.arange(values.size), values))
    return order[:count].astype(np.int64)
