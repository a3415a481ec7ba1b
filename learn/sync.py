"""Agreement across data-parallel ranks: the controllers decide from synchronized values,
and rank 0's layouts are installed everywhere."""
from __future__ import annotations

import numpy as np
import torch

from numbasparse.layout import BlockLayout

__all__ = ["distributed", "broadcast_layouts"]


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_layouts(layouts: list, device: torch.device) -> list:
    """Rank 0's ``layouts``, on every rank (one broadcast of all slot tables, through
    ``device``; a CUDA device under NCCL)."""
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.from_numpy(np.concatenate([l.slot_table.ravel() for l in layouts]).astype(np.int64)).to(device)
    torch.distributed.broadcast(flat, src=0)
    flat = flat.cpu().numpy()
    out, offset = [], 0
    for layout in layouts:
        table = flat[offset:offset + layout.in_blocks * layout.out_blocks].reshape(layout.shape)
        offset += table.size
        rows, cols = np.nonzero(table >= 0)
        out.append(BlockLayout(table >= 0, table[rows, cols], layout.capacity))
    return out
