"""A :class:`~numbasparse.layout.BlockLayout` as one int32 tensor: the form in which a
layout reaches the ops registered with PyTorch (:mod:`numbasparse.ops`), so that
``torch.compile``, ``torch.export`` and module buffers handle it like any tensor.

Contents (int32, 1-D, ``4 + 3 * nnz`` entries)::

    [in_blocks, out_blocks, capacity, nnz,
     entry_rows[0:nnz], entry_cols[0:nnz], entry_slots[0:nnz]]

The ops turn the tensor back into the layout whose kernel tables they use: a tensor
made by :func:`layout_tensor` carries its layout as an attribute (no work); any other
tensor with these contents (a copy moved to another device, a buffer of an exported
program) is decoded once and keeps the decoded layout as an attribute too.
"""
from __future__ import annotations

import collections
import threading

import numpy as np
import torch

from .layout import BlockLayout

__all__ = ["layout_tensor", "layout_of", "HEADER"]

HEADER = 4
_ATTRIBUTE = "_numbasparse_layout"
_decoded: collections.OrderedDict = collections.OrderedDict()   # contents -> layout, recent last
_DECODED_KEPT = 256
_lock = threading.Lock()


def _encode(layout: BlockLayout) -> np.ndarray:
    header = np.array([layout.in_blocks, layout.out_blocks, layout.capacity, layout.nnz], dtype=np.int32)
    return np.concatenate([header, layout.entry_rows, layout.entry_cols, layout.entry_slots]).astype(np.int32)


def layout_tensor(layout: BlockLayout, device="cpu") -> torch.Tensor:
    """``layout`` as an int32 tensor on ``device`` (cached on the layout per device)."""
    device = torch.device(device)
    key = ("layout-tensor", str(device))
    cache = layout._device_tables
    found = cache.get(key)
    if found is None:
        found = torch.from_numpy(_encode(layout)).to(device)
        setattr(found, _ATTRIBUTE, layout)
        cache[key] = found
    return found


def layout_of(tensor: torch.Tensor) -> BlockLayout:
    """The layout a tensor made by :func:`layout_tensor` (or a copy of one) stands for."""
    layout = getattr(tensor, _ATTRIBUTE, None)
    if layout is not None:
        return layout
    if tensor.dtype != torch.int32 or tensor.dim() != 1 or tensor.numel() < HEADER:
        raise ValueError(f"a layout tensor is 1-D int32 with at least {HEADER} entries, got {tensor.dtype} "
                         f"of shape {tuple(tensor.shape)}")
    values = tensor.detach().cpu().numpy()
    key = values.tobytes()
    with _lock:
        layout = _decoded.get(key)
        if layout is not None:
            _decoded.move_to_end(key)
    if layout is None:
        layout = _decode(values)
        with _lock:
            _decoded[key] = layout
            while len(_decoded) > _DECODED_KEPT:
                _decoded.popitem(last=False)
    try:
        setattr(tensor, _ATTRIBUTE, layout)
    except (AttributeError, RuntimeError):  # tensors that take no attributes decode every time
        pass
    return layout


def _decode(values: np.ndarray) -> BlockLayout:
    in_blocks, out_blocks, capacity, nnz = (int(v) for v in values[:HEADER])
    if min(in_blocks, out_blocks, capacity, nnz) < 0 or values.size != HEADER + 3 * nnz:
        raise ValueError(f"not a layout tensor: header {values[:HEADER].tolist()} with {values.size} entries")
    rows, cols, slots = values[HEADER:].reshape(3, nnz).astype(np.int64)
    if nnz and (rows.max() >= in_blocks or cols.max() >= out_blocks or min(rows.min(), cols.min()) < 0):
        raise ValueError("not a layout tensor: block coordinates outside its shape")
    mask = np.zeros((in_blocks, out_blocks), dtype=bool)
    mask[rows, cols] = True
    order = np.lexsort((cols, rows))      # the layout lists its entries in row-major order
    if np.count_nonzero(mask) != nnz:
        raise ValueError("not a layout tensor: an entry is listed twice")
    return BlockLayout(mask, slots[order], capacity)
