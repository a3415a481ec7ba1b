"""Slot-stored parameters sharded by FSDP (``torch.distributed.fsdp.fully_shard``).

Between forward passes FSDP keeps each parameter as a ``DTensor`` sharded along dim
0, the slot dimension: every rank holds a contiguous range of slots.  Reading a whole
parameter (the gates, to rank blocks) goes through :func:`full_tensor`; writing some
slots (closing a removed block's gate, zeroing its weight and optimizer state) goes
through :func:`fill_slots_`, which writes the slots of the local range only, so every
rank writes its own part and no communication is needed.  Plain tensors pass through.
"""
from __future__ import annotations

import torch

__all__ = ["is_sharded", "full_tensor", "fill_slots_"]

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed support
    DTensor = None


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded or replicated by FSDP)."""
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` (gathered from the ranks, differentiably, when it is a DTensor)."""
    return t.full_tensor() if is_sharded(t) else t


def _local_slots(t) -> tuple:
    """``(local tensor, first slot)`` of a DTensor sharded along dim 0 at most."""
    for placement in t.placements:
        if not isinstance(placement, (Replicate, Shard)) or (isinstance(placement, Shard) and placement.dim != 0):
            raise ValueError(f"slot-stored parameters can be sharded along dim 0 only, got placements {t.placements}")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), offset[0]


@torch.no_grad()
def fill_slots_(t: torch.Tensor, index: torch.Tensor, value: float) -> None:
    """``t[index] = value`` along dim 0 (``index``: int64 slots), on a plain tensor or on
    this rank's slots of a DTensor."""
    if not is_sharded(t):
        t[index.to(t.device)] = value
        return
    local, start = _local_slots(t)
    index = index.to(local.device)
    mine = (index >= start) & (index < start + local.shape[0])
    local[index[mine] - start] = value
