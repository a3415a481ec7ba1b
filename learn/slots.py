"""Installing a new layout in a slot-stored layer: what the controllers
(:class:`~learn.DynamicSparsity`, :class:`~learn.GradualPruning`) do to a layer once
they have decided which blocks go and which come back."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from numbasparse.layout import BlockLayout
from numbasparse.optim_state import reset_slots
from numbasparse.sharding import fill_slots_
from numbasparse.storage import BlockStorage

__all__ = ["install_layout", "block_sparse_layers", "live_block_norms", "allocate"]


def block_sparse_layers(model: nn.Module) -> list:
    """``[(name, layer), ...]`` for every slot-stored block-sparse layer in ``model``
    (``BlockSparseLinear``, ``BlockSparseConv2d`` and the gated layers), in
    ``named_modules()`` order; a ``DistributedDataParallel`` / ``DataParallel`` wrapper is
    looked through."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BlockStorage)]


@torch.no_grad()
def install_layout(layer, before: BlockLayout, after: BlockLayout, optimizers=()) -> tuple:
    """Install ``after`` in ``layer`` (whose layout is ``before``) and clear every slot it
    frees or fills: weight zeroed, optimizer state (in each of ``optimizers``) reset to
    what the optimizer gives a fresh parameter, gradient zeroed; for a gated layer the
    gates of freed slots are closed for good and those of filled slots start afresh.
    Returns ``(removed, regrown)`` block counts."""
    old_tab, new_tab = before.slot_table, after.slot_table
    gone = (old_tab >= 0) & (old_tab != new_tab)
    came = (new_tab >= 0) & (new_tab != old_tab)
    freed = old_tab[gone]
    filled = new_tab[came]
    touched = np.union1d(freed, filled)
    if touched.size:
        index = torch.as_tensor(touched, dtype=torch.long, device=layer.weight.device)
        fill_slots_(layer.weight, index, 0.0)
        params = [layer.weight]
        gate = getattr(layer, "gate", None)
        if gate is not None:
            dead = np.setdiff1d(freed, filled)
            if dead.size:
                gate.kill_(dead)
            if filled.size:
                gate.reset_(filled)
            params.append(gate.log_alpha)
        for param in params:
            reset_slots(param, index.to(param.device), optimizers)
    if after != before:
        layer.set_layout(after)
    return int(gone.sum()), int(came.sum())


def live_block_norms(name: str, layer) -> np.ndarray:
    """Frobenius norm of each live block of ``layer`` (layout entry order), float64.
    ValueError naming the layer when its weight holds NaN or infinity (training diverged:
    no block ranking means anything then)."""
    w = layer.weight.detach()
    norms = w.reshape(w.shape[0], -1).double().norm(dim=1).cpu().numpy()[layer.layout.entry_slots]
    if not np.isfinite(norms).all():
        raise ValueError(f"weight of layer {name or '<root>'!r} holds non-finite values: training diverged; "
                         "nothing was removed (lower the learning rate or clip gradients)")
    return norms


def allocate(count: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split ``count`` items over bins in proportion to ``weights`` without exceeding
    ``caps`` (largest remainder; spare items go to bins with room, in order)."""
    alloc = np.zeros(len(caps), dtype=np.int64)
    remaining = int(min(count, caps.sum()))
    while remaining > 0:
        room = caps - alloc
        w = np.where(room > 0, weights, 0.0).astype(np.float64)
        if w.sum() <= 0:
            w = (room > 0).astype(np.float64)
        share = remaining * w / w.sum()
        base = np.minimum(np.floor(share).astype(np.int64), room)
        if base.sum() == 0:
            order = np.argsort(-(share - np.floor(share)), kind="stable")
            for k in order:
                if remaining == 0:
                    break
                if room[k] > 0:
                    alloc[k] += 1
                    remaining -= 1
        else:
            alloc += base
            remaining -= int(base.sum())
    return alloc
