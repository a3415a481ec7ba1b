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

__all__ = ["install_layout", "block_sparse_layers"]


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
