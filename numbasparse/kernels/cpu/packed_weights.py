"""Column-ordered copies of weights that stay unchanged between calls (inference).

With few rows (the direct forward program: batch 1, an RNN step) a forward pass is
bound by reading the weight blocks once.  Blocks live in storage slots in an order
that suits training (slots are reused as blocks come and go), so the blocks of one
output column are scattered and each 4 KiB block is a fresh start for the hardware
prefetcher.  Streaming them in column order from one contiguous copy runs closer to
the memory bandwidth (measured on hidden 4096, batch 1, density 0.1: 0.22 -> 0.19 ms).

A copy is made only once a weight is seen unchanged (same tensor, same version
counter, same layout) on a second call, so training, where every step changes the
weights, never pays for one; it is dropped when the weight changes or dies.  Small
weights (under ``MIN_BYTES``) are not copied: they stay in cache anyway.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

MIN_BYTES = 1 << 20

# id(weight) -> [weakref to the weight, state, layout, copy or None], state being the
# version counter, data pointer, dtype and shape (``param.data = ...`` and ``.double()``
# change the data without counting a version).  Keyed by id: tensors compare
# element-wise, so they cannot be dictionary keys themselves.
_entries: dict = {}


def _forget(key):
    return lambda _: _entries.pop(key, None)


def _sequential_slots(layout):
    cache = layout._device_tables
    found = cache.get("cpu-sequential-slots")
    if found is None:
        found = cache["cpu-sequential-slots"] = np.arange(layout.nnz, dtype=np.int32)
    return found


def column_ordered(w: torch.Tensor, layout):
    """``(weight, col_slots)`` to run the forward pass with: a column-ordered copy of
    ``w`` and sequential slots when ``w`` has been seen unchanged before, else ``w``
    and the layout's own ``col_slots``."""
    if w.numel() * w.element_size() < MIN_BYTES:
        return w, layout.col_slots
    try:
        version = (w._version, w.data_ptr(), w.dtype, tuple(w.shape))
    except RuntimeError:  # inference tensors have no version counter
        return w, layout.col_slots
    key = id(w)
    entry = _entries.get(key)
    if entry is None or entry[0]() is not w:
        _entries[key] = [weakref.ref(w, _forget(key)), version, layout, None]
        return w, layout.col_slots
    if entry[1] != version or entry[2] is not layout:
        entry[1:] = [version, layout, None]
        return w, layout.col_slots
    if entry[3] is None:
        slots = torch.from_numpy(layout.col_slots.astype(np.int64))
        entry[3] = w.detach().index_select(0, slots).contiguous()
    return entry[3], _sequential_slots(layout)
