"""DynamicSparsity: removes blocks whose L0 gate has closed (and optionally regrows
others) while a model trains, so the block-sparse kernels do less work as the model
gets sparser.  Given a ``target_density`` it also brings the model to that density on a
schedule and holds it there.

Typical loop (one optimizer over all parameters, common learning rate, nothing to tune)::

    model = nn.Sequential(learn.L0BlockSparseLinear(512, 2048), nn.ReLU(), ...)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = learn.DynamicSparsity(model, opt, target_density=0.2)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + learn.l0_penalty(model, target_density=0.2)
        opt.zero_grad(); loss.backward(); opt.step()
        report = ctrl.step()          # a SparsityReport on update steps, else None
        if report: print(report)

**Why a schedule.**  A gate starts at keep probability 0.9 (``log_alpha`` ~ 0.6) and is
removed once its keep probability falls below ``threshold`` (0.3: ``log_alpha`` < -2.45).
Adam moves a parameter by at most about ``lr`` per step, so at ``lr=1e-3`` no penalty
weight can close a gate in fewer than ~3,000 steps; the gates alone reach a target only
with a hand-tuned gate learning rate and penalty weight.  With ``target_density`` the
controller therefore removes blocks itself, following a density schedule; the gates (and
the penalty) decide *which* blocks go, not *when*.

What an update does, for every gated layer (weights are stored per slot, gates too):

1. **Removal.** Live blocks whose keep probability ``P(z != 0)`` is below ``threshold``
   leave the layout (``layer.set_layout(layout.remove(...))``): the kernels' index
   tables get shorter, so the kernels stop computing them.  The freed slot's weight
   block and its gradient are zeroed and every optimizer state tensor that follows the
   slots (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, Adagrad ``sum``, Rprop
   ``step_size``, factored moments, ...) gets the value the optimizer starts a fresh
   parameter at (:mod:`numbasparse.optim_state`), for the weight and for
   ``gate.log_alpha``; ``log_alpha`` is set
   to :data:`~learn.gates.DEAD_LOG_ALPHA` (-20: every sample of the gate is exactly 0)
   so that nothing read from a free slot is non-zero.  A layer always keeps at least
   one block.
2. **Schedule** (with ``target_density = d``).  The update also removes the live blocks
   with the lowest scores until the live count is down to
   ``n(step) = ceil(d(step) * total blocks)``, where ``d(step)`` falls from the density
   ``d0`` at construction to ``d`` on the cubic schedule of Zhu & Gupta (2017) over ``ramp``
   steps after ``start`` (default 1000: the target is reached by step 1000 at the default
   ``every``), then stays at ``d``::

       d(step) = d + (d0 - d) * (1 - clamp((step - start) / ramp, 0, 1)) ** 3

   The score of a block is its keep probability times its weight norm relative to the
   mean norm of its layer's live blocks, ``P(z != 0) * ||W_s|| / mean ||W||``; closed
   blocks (below ``threshold``) go first in any case.  Without regrowth nothing is ever
   removed below ``ceil(d * total blocks)``; removed blocks never come back, so once
   there the density holds.
3. **Regrowth** (``regrow="gradient"`` or ``"random"``).  Dead blocks (not those removed at
   this update) are revived into free slots with a zero weight, fresh optimizer state
   (as for removal) and a fresh gate (``log_alpha`` at the layer's ``init_keep``) until the total number of live
   blocks is back to the scheduled count ``n(step)`` (``ceil(target_density * total)``
   after the ramp; without a target, the count when the controller was created:
   RigL-style constant density).  The blocks to revive are
   spread over the layers in proportion to what each lost at this update.  ``"gradient"`` picks, per
   layer, the dead blocks with the largest Frobenius norm of the dense weight gradient
   of the last training batch before the update (``x^T dy`` for a linear layer, captured
   with forward/gradient hooks armed only for that batch and averaged over DDP ranks);
   ``"random"`` picks uniformly with a generator seeded by ``(seed, update index, layer)``.

Parameters never change shape during updates, so the optimizer, DDP and checkpoints
keep working while the masks change.  :meth:`DynamicSparsity.compact` (or
``layer.compact(optimizer)``) shrinks the storage to the live blocks explicitly, in
place: the Parameters stay the same objects and the optimizer's per-slot state is
gathered with them; a DDP wrapper must be rebuilt (its buckets have the old sizes),
another optimizer with state for the layers raises at its next step, and regrowth has
no free slots until blocks are removed again.  A checkpoint saved after compaction
loads into a freshly built model and optimizer in the standard order.

Under ``torch.distributed`` the decisions depend only on synchronized values (gate
parameters, averaged gradients, the seed); in addition the layouts decided on rank 0
are broadcast at every update and at construction, so ranks cannot diverge.  Adam's
per-Parameter ``step`` count is not per slot; a revived slot therefore restarts from zero
moments with the Parameter's bias correction (as RigL does).
"""
from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn

from numbasparse._interrupts import deferred_interrupts
from numbasparse.layout import BlockLayout
from numbasparse.optim_state import as_optimizers

from .layers import block_grad_norms, gated_layers
from .penalty import block_density, check_target_density
from .reports import LayerReport, SparsityReport
from .schedule import check_int, cubic_density
from .slots import allocate, install_layout, live_block_norms
from .sync import broadcast_layouts, distributed

__all__ = ["DynamicSparsity", "SparsityReport", "LayerReport", "DEFAULT_RAMP"]

_REGROW_MODES = (None, "gradient", "random")

#: Default length, in training steps, of the schedule from the start density to
#: ``target_density`` (see :meth:`DynamicSparsity.scheduled_density`).
DEFAULT_RAMP = 1000


def _block_scores(name: str, layer, p: np.ndarray) -> np.ndarray:
    """Score of each live entry of ``layer`` (layout entry order) for scheduled removal:
    keep probability times the Frobenius norm of the block's weight relative to the mean
    norm of the layer's live blocks, ``p_s * ||W_s|| / mean_live ||W||`` (the relative norm
    makes layers of different scales, fan-ins or kinds comparable)."""
    norms = live_block_norms(name, layer)
    mean = norms.mean() if norms.size else 0.0
    return p * (norms / mean if mean > 0 else np.ones_like(norms))


class DynamicSparsity:
    """Controller that removes blocks with closed L0 gates (and optionally regrows
    blocks) every ``every`` training steps; with a ``target_density`` it also removes the
    lowest-scoring blocks on a schedule that reaches the target and holds it.  Call :meth:`step` once per training step,
    after ``optimizer.step()``.  See the module docstring for what an update does.

    Args:
        model: module (or DDP wrapper) containing gated layers
            (:class:`~learn.L0BlockSparseLinear`, :class:`~learn.L0BlockSparseConv2d`).
        optimizer: the ``torch.optim.Optimizer`` training the model, or a list or tuple of
            them when its parameters are split over several (their per-slot state is
            re-initialized for removed/regrown blocks and gathered on compaction), or None.
        every: steps between updates (int >= 1).  Updates happen after steps
            ``start + every, start + 2*every, ...`` up to ``stop``.
        threshold: remove live blocks whose keep probability ``P(z != 0)`` is below it,
            in (0, 1).  The default 0.3 is just under the keep probability (0.310 with the
            default gate settings) below which the evaluation gate is exactly zero, so
            removing such a block does not change the model's evaluation output.
        regrow: None, ``"gradient"`` (largest dense-gradient norm, RigL) or ``"random"``.
        target_density: fraction ``d`` in (0, 1] of all block positions (over all gated
            layers) to bring the model to and hold: updates follow the schedule of
            :meth:`scheduled_density` down to it, never below ``ceil(d * total)`` live
            blocks without regrowth; with regrowth, the level regrowth refills to.  None:
            remove closed blocks only.
        seed: seed of the random regrowth (int >= 0).
        start, stop: first step after which updates may happen, and last step at
            which one may happen (None: no end); with a target, ``stop`` must not come
            before ``start + ramp``.
        ramp: with ``target_density``, steps from ``start`` over which the scheduled
            density falls to the target (int >= 0; default :data:`DEFAULT_RAMP` = 1000;
            0: straight to the target at the first update).  Only with ``target_density``.

    Attributes:
        history: list of :class:`SparsityReport`, one per update (``report.scheduled``:
            the density the schedule asked for).
        steps: training steps counted so far; ``updates``: updates done so far.
        sync_mismatches: under torch.distributed, how many updates this rank decided
            differently from rank 0 before adopting rank 0's layouts (0 when the ranks'
            parameters are in sync, as they are under DDP).
    """

    def __init__(self, model: nn.Module, optimizer, every: int = 100, threshold: float = 0.3,
                 regrow: str | None = None, target_density: float | None = None, seed: int = 0,
                 start: int = 0, stop: int | None = None, ramp: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._optimizers = as_optimizers(optimizer)
        self.every = check_int(every, "every", 1)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            raise TypeError(f"threshold must be a number in (0, 1), got {threshold!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if regrow not in _REGROW_MODES:
            raise ValueError(f"regrow must be one of {_REGROW_MODES}, got {regrow!r}")
        target_density = check_target_density(target_density)
        self.seed = check_int(seed, "seed", 0)
        self.start = check_int(start, "start", 0)
        self.stop = None if stop is None else check_int(stop, "stop", self.start)
        if ramp is not None and target_density is None:
            raise ValueError("ramp needs target_density: it is the length of the schedule to the target")
        self.ramp = None if target_density is None else (DEFAULT_RAMP if ramp is None else check_int(ramp, "ramp", 0))
        if self.ramp is not None and self.stop is not None and self.stop < self.start + self.ramp:
            raise ValueError(f"stop={self.stop} comes before the end of the ramp to target_density "
                             f"(start + ramp = {self.start + self.ramp}): the target would never be reached")
        self.model = model
        self.optimizer = optimizer
        self.threshold = float(threshold)
        self.regrow = regrow
        self.target_density = target_density
        self.steps = 0
        self.updates = 0
        self.sync_mismatches = 0
        self.history: list[SparsityReport] = []
        self._layers = gated_layers(model)
        if not self._layers:
            raise ValueError("model has no gated layers (learn.L0BlockSparseLinear / L0BlockSparseConv2d)")
        if distributed():
            for (_, layer), layout in zip(self._layers, self._broadcast([l.layout for _, l in self._layers])):
                if layout != layer.layout:
                    layer.set_layout(layout)
        self.initial_nnz = sum(layer.layout.nnz for _, layer in self._layers)
        self._arm(self.steps)

    # ------------------------------------------------------------- schedule
    def layers(self) -> list:
        """``[(name, layer), ...]``: the gated layers of the model (found at construction)."""
        return list(self._layers)

    def is_update_step(self, step: int) -> bool:
        """Whether an update runs after training step ``step`` (1-based)."""
        if step <= self.start or (self.stop is not None and step > self.stop):
            return False
        return (step - self.start) % self.every == 0

    def total_blocks(self) -> int:
        """Number of block positions, live or not, over all gated layers."""
        return sum(layer.layout.in_blocks * layer.layout.out_blocks for _, layer in self._layers)

    def scheduled_density(self, step: int) -> float | None:
        """Density the schedule asks for after training step ``step`` (None without
        ``target_density``): the cubic ramp of Zhu & Gupta (2017) from the density ``d0`` at
        construction to the target ``d`` over ``ramp`` steps from ``start``::

            d(step) = d + (d0 - d) * (1 - clamp((step - start) / ramp, 0, 1)) ** 3

        (``d0`` when it is already below ``d``: nothing is removed to follow the ramp then)."""
        if self.target_density is None:
            return None
        d, d0 = self.target_density, self.initial_nnz / self.total_blocks()
        if d0 <= d:
            return d0
        if self.ramp == 0:
            return d
        return cubic_density(step, d0, d, self.start, self.start + self.ramp)

    def scheduled_nnz(self, step: int) -> int | None:
        """Live blocks the schedule asks for after step ``step``: ``ceil(scheduled_density * total)``,
        never fewer than ``ceil(target_density * total)`` (None without ``target_density``)."""
        if self.target_density is None:
            return None
        total = self.total_blocks()
        return max(self._floor(), math.ceil(self.scheduled_density(step) * total - 1e-9))

    def _floor(self) -> int:
        return math.ceil(self.target_density * self.total_blocks() - 1e-9)

    def _arm(self, step: int) -> None:
        """Capture the next batch in the layers when step ``step + 1`` is an update step
        that regrows by gradient."""
        armed = self.regrow == "gradient" and self.is_update_step(step + 1)
        for _, layer in self.layers():
            layer._arm_capture(armed)

    def step(self) -> SparsityReport | None:
        """Count one training step; on update steps run the update and return its
        report, otherwise return None.  A ``KeyboardInterrupt`` leaves the controller
        and the model as before the call or as after it, never in between."""
        step = self.steps + 1
        if self.is_update_step(step):
            return self._update(step)
        self._arm(step)
        self.steps = step
        return None

    # --------------------------------------------------------------- update
    def update(self) -> SparsityReport:
        """Remove (and regrow) blocks now; returns the :class:`SparsityReport`."""
        return self._update(self.steps)

    @torch.no_grad()
    def _update(self, step: int) -> SparsityReport:
        """Plan the new layouts (nothing changes yet), then install them and record the
        update with Ctrl-C held back: all of it happens or none of it does."""
        layers = self.layers()
        index = self.updates + 1
        old = [layer.layout for _, layer in layers]
        after, removed = self._plan_removal(layers, old, step)
        new = self._plan_regrowth(layers, old, after, removed, index, step) if self.regrow else after
        mismatch = False
        if distributed():
            agreed = self._broadcast(new)
            mismatch = agreed != new
            new = agreed
        report = SparsityReport(step, index, scheduled=self.scheduled_density(step))
        with deferred_interrupts():
            for (name, layer), before, layout in zip(layers, old, new):
                n_removed, n_regrown = self._apply(layer, before, layout)
                report.layers.append(LayerReport(name, layout.nnz, layout.in_blocks * layout.out_blocks,
                                                 n_removed, n_regrown))
            self.history.append(report)
            self.updates = index
            self.sync_mismatches += int(mismatch)
            self._arm(step)
            self.steps = step
        if mismatch:
            warnings.warn("this rank's block decisions differed from rank 0's; rank 0's layouts are used",
                          RuntimeWarning, stacklevel=3)
        return report

    def _plan_removal(self, layers, old, step):
        """Layouts after removal, and the removed (rows, cols) per layer."""
        scheduled = self.target_density is not None
        candidates = []  # (0 closed / 1 open, keep probability / score, layer index, entry index)
        for li, ((name, layer), layout) in enumerate(zip(layers, old)):
            p = layer.gate.prob_nonzero().detach().double().cpu().numpy()[layout.entry_slots]
            if not np.isfinite(p).all():
                bad = int(layout.entry_slots[np.flatnonzero(~np.isfinite(p))[0]])
                raise ValueError(f"gate keep probabilities of layer {name or '<root>'!r} are not finite "
                                 f"(log_alpha of slot {bad} is {layer.gate.log_alpha[bad].item()}): training "
                                 "diverged; nothing was removed (lower the learning rate or clip gradients)")
            closed = p < self.threshold
            # closed blocks go first, lowest keep probability first; then (with a target) the
            # open ones, lowest score first
            value = np.where(closed, p, _block_scores(name, layer, p) if scheduled else p)
            if layout.nnz == 0:
                continue
            best = np.lexsort((-np.arange(layout.nnz), value, ~closed))[-1]  # a layer keeps its best block
            entries = np.arange(layout.nnz) if scheduled else np.flatnonzero(closed)
            candidates.extend((int(not closed[e]), float(value[e]), li, int(e)) for e in entries if e != best)
        candidates.sort()
        if scheduled:
            nnz = sum(l.nnz for l in old)
            goal = self.scheduled_nnz(step)
            closed = sum(1 for c in candidates if c[0] == 0)
            count = max(closed, nnz - goal)
            if self.regrow is None:  # removals never go below the target
                count = min(count, max(0, nnz - self._floor()))
            candidates = candidates[:count]
        after, removed = [], []
        for li, layout in enumerate(old):
            entries = np.array(sorted(c[3] for c in candidates if c[2] == li), dtype=np.int64)
            rows, cols = layout.entry_rows[entries], layout.entry_cols[entries]
            after.append(layout.remove(rows, cols) if entries.size else layout)
            removed.append((rows, cols))
        return after, removed

    def _plan_regrowth(self, layers, old, after, removed, index, step):
        goal = self.initial_nnz if self.target_density is None else self.scheduled_nnz(step)
        deficit = max(0, goal - sum(l.nnz for l in after))
        eligible = []
        for layout, (rows, cols) in zip(after, removed):
            ok = ~layout.mask
            ok[rows, cols] = False  # do not revive what this update removed
            eligible.append(ok)
        caps = np.array([min(int(ok.sum()), l.free_slots().size) for ok, l in zip(eligible, after)])
        lost = np.array([r.size for r, _ in removed], dtype=np.float64)
        weights = lost if lost.sum() > 0 else np.array([ok.sum() for ok in eligible], dtype=np.float64)
        counts = allocate(deficit, weights, caps)
        scores = self._gradient_scores(layers) if self.regrow == "gradient" and counts.sum() > 0 else None
        new = []
        for li, (layout, ok, k) in enumerate(zip(after, eligible, counts)):
            if k == 0:
                new.append(layout)
                continue
            positions = np.flatnonzero(ok.ravel())
            if scores is not None:
                s = scores[li].ravel()[positions]
                chosen = positions[np.argsort(-s, kind="stable")[:k]]
            else:
                rng = np.random.default_rng([self.seed, index, li])
                chosen = rng.choice(positions, size=int(k), replace=False)
            chosen = np.sort(chosen)
            rows, cols = np.unravel_index(chosen, layout.shape)
            new.append(layout.add(rows, cols))
        return new

    def _gradient_scores(self, layers):
        scores = []
        for name, layer in layers:
            grad = layer.captured_weight_grad()
            if grad is None:
                raise RuntimeError(
                    f"gradient regrowth needs the last training batch of layer {name!r}, but none "
                    "was captured: run a forward and backward pass in training before the update "
                    "(DynamicSparsity.step() arms the capture one step ahead)")
            if distributed():
                grad = grad.contiguous()
                torch.distributed.all_reduce(grad)
                grad /= torch.distributed.get_world_size()
            scores.append(block_grad_norms(grad, layer.layout.shape, layer.block_size).cpu().numpy())
        return scores

    def _broadcast(self, layouts):
        return broadcast_layouts(layouts, self.layers()[0][1].weight.device)

    def _apply(self, layer, before: BlockLayout, after: BlockLayout):
        """Install ``after`` and clear the slots it frees or fills; returns (removed, regrown)."""
        return install_layout(layer, before, after, self._optimizers)

    # ------------------------------------------------------------- compaction
    @torch.no_grad()
    def compact(self) -> None:
        """Shrink every gated layer's storage (weight and gates) to its live blocks, in
        place, with the optimizer's per-slot state (see :meth:`numbasparse.nn.BlockStorage.compact`).

        The Parameters stay the same objects; a ``DistributedDataParallel`` wrapper
        must still be rebuilt (its buckets have the old sizes): re-wrap ``model.module``.
        """
        with deferred_interrupts():
            for _, layer in self.layers():
                layer.compact(self._optimizers)

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """Schedule position (``steps``, ``updates``, ``initial_nnz``: the start of the
        density schedule) and history.  Layouts, gates and their noise keys and counters are in
        the model's ``state_dict``; optimizer state in the optimizer's."""
        return {"steps": self.steps, "updates": self.updates, "initial_nnz": self.initial_nnz,
                "history": [r.as_dict() for r in self.history],
                "config": {"every": self.every, "threshold": self.threshold, "regrow": self.regrow,
                           "target_density": self.target_density, "seed": self.seed,
                           "start": self.start, "stop": self.stop, "ramp": self.ramp}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the settings given to the constructor stay);
        nothing changes when ``state`` is incomplete."""
        steps, updates = check_int(state["steps"], "steps", 0), check_int(state["updates"], "updates", 0)
        initial_nnz = check_int(state["initial_nnz"], "initial_nnz", 0)
        history = [SparsityReport.from_dict(d) for d in state.get("history", [])]
        self.steps, self.updates, self.initial_nnz, self.history = steps, updates, initial_nnz, history
        self._arm(self.steps)

    def density(self) -> float:
        """Live fraction of all block positions of all gated layers, now."""
        return block_density(self.model)

    def __repr__(self):
        return (f"DynamicSparsity(every={self.every}, threshold={self.threshold}, regrow={self.regrow!r}, "
                f"target_density={self.target_density}, ramp={self.ramp}, steps={self.steps}, density={self.density():.3f})")
