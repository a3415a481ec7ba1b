"""BlockLayout: which blocks of a block-sparse weight exist, and where they live.

A layout is a boolean block mask of shape ``(in_blocks, out_blocks)``: entry
``[i, j]`` is True when input block ``i`` feeds output block ``j``.  Each live entry
owns a *slot* in the weight storage ``w[capacity, B, B]``; block ``w[slot]`` maps
``x[:, i*B:(i+1)*B]`` into ``y[:, j*B:(j+1)*B]``.  By default slots are numbered
0..nnz-1 in row-major order of the live entries and ``capacity == nnz``; layers that
change their mask during training keep a fixed capacity and reuse freed slots.

The layout is immutable.  Its index tables (all ``int32``, all read-only) are what
the kernels consume:

* entries:   ``entry_rows[e], entry_cols[e], entry_slots[e]`` for the nnz live
  entries in row-major order;
* by column: ``col_ptr[j]:col_ptr[j+1]`` indexes ``col_rows``/``col_slots``, the live
  input blocks of output block ``j`` (forward pass);
* by row:    ``row_ptr[i]:row_ptr[i+1]`` indexes ``row_cols``/``row_slots``, the live
  output blocks of input block ``i`` (data gradient).
"""
from __future__ import annotations

import operator

import numpy as np

__all__ = ["BlockLayout"]


_MAX_INDEX = np.iinfo(np.int32).max


def _frozen(array, dtype=np.int32):
    """A read-only view of a read-only copy: numpy refuses to make such a view writable
    again (the kernels trust these tables)."""
    base = np.array(array, dtype=dtype, order="C", copy=True)
    base.flags.writeable = False
    view = base.view()
    view.flags.writeable = False
    return view


def _as_mask(mask) -> np.ndarray:
    if isinstance(mask, BlockLayout):
        return mask.mask
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):  # torch.Tensor
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"layout must be a 2-D block mask (in_blocks, out_blocks), got {arr.ndim}-D shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.copy()
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"layout must be boolean-like (bool or 0/1 numbers), got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError("layout must be boolean-like: entries must be 0 or 1 (or True/False)")
    return arr.astype(bool)


class BlockLayout:
    """Immutable block mask of shape ``(in_blocks, out_blocks)`` with kernel index tables.

    Args:
        mask: 2-D bool-like array (numpy, torch or nested lists) of 0/1 entries.
        slots: optional int array of length ``nnz``: the storage slot of each live
            entry, in row-major order of the entries.  Defaults to ``0..nnz-1``.
        capacity: number of storage slots (``w.shape[0]``); defaults to ``nnz`` or
            ``max(slots) + 1``.  Slots must be distinct and ``< capacity``.
    """

    __slots__ = ("_mask", "_capacity", "_tables", "_slot_of", "_device_tables", "__weakref__")

    def __init__(self, mask, slots=None, capacity=None):
        mask = _as_mask(mask)
        mask.flags.writeable = False
        self._mask = mask
        rows, cols = np.nonzero(mask)  # row-major order
        nnz = rows.size
        if slots is None:
            slots = np.arange(nnz)
        else:
            slots = np.array(slots, copy=True)
            if slots.shape != (nnz,):
                raise ValueError(f"slots must have one entry per live block ({nnz}), got shape {slots.shape}")
            if slots.size and (slots.dtype.kind not in "iu" or slots.min() < 0):
                raise ValueError("slots must be non-negative integers")
            if np.unique(slots).size != nnz:
                raise ValueError("slots must be distinct: two live blocks cannot share storage")
        if capacity is None:
            capacity = int(slots.max()) + 1 if nnz else 0
        try:
            capacity = operator.index(capacity)
        except TypeError:
            raise ValueError(f"capacity must be an integer, got {capacity!r}") from None
        if nnz and capacity <= int(slots.max()):
            raise ValueError(f"capacity {capacity} is too small for slot {int(slots.max())}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if capacity > _MAX_INDEX:
            raise ValueError(f"capacity {capacity} is too large: slots are int32 (at most {_MAX_INDEX})")
        if max(mask.shape) > _MAX_INDEX:
            raise ValueError(f"layout shape {mask.shape} is too large: block indices are int32")
        self._capacity = capacity
        in_blocks, out_blocks = mask.shape
        by_col = np.lexsort((rows, cols))      # column-major order
        self._tables = {
            "entry_rows": _frozen(rows), "entry_cols": _frozen(cols), "entry_slots": _frozen(slots),
            "row_ptr": _frozen(np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=in_blocks))])),
            "row_cols": _frozen(cols),         # row-major order is already grouped by row
            "row_slots": _frozen(slots),
            "col_ptr": _frozen(np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=out_blocks))])),
            "col_rows": _frozen(rows[by_col]), "col_slots": _frozen(slots[by_col]),
        }
        slot_of = np.full(mask.shape, -1, dtype=np.int64)
        slot_of[rows, cols] = slots
        self._slot_of = _frozen(slot_of, np.int64)
        self._device_tables = {}

    # ----------------------------------------------------------------- properties
    entry_rows = property(lambda self: self._tables["entry_rows"], doc="``(nnz,)`` block row of each live entry")
    entry_cols = property(lambda self: self._tables["entry_cols"], doc="``(nnz,)`` block column of each live entry")
    entry_slots = property(lambda self: self._tables["entry_slots"], doc="``(nnz,)`` slot of each live entry")
    row_ptr = property(lambda self: self._tables["row_ptr"], doc="``(in_blocks + 1,)`` offsets into row_cols/row_slots")
    row_cols = property(lambda self: self._tables["row_cols"], doc="``(nnz,)`` output blocks, grouped by row")
    row_slots = property(lambda self: self._tables["row_slots"], doc="``(nnz,)`` slots, grouped by row")
    col_ptr = property(lambda self: self._tables["col_ptr"], doc="``(out_blocks + 1,)`` offsets into col_rows/col_slots")
    col_rows = property(lambda self: self._tables["col_rows"], doc="``(nnz,)`` input blocks, grouped by column")
    col_slots = property(lambda self: self._tables["col_slots"], doc="``(nnz,)`` slots, grouped by column")

    @property
    def shape(self) -> tuple:
        """``(in_blocks, out_blocks)``."""
        return tuple(self._mask.shape)

    @property
    def in_blocks(self) -> int:
        return self._mask.shape[0]

    @property
    def out_blocks(self) -> int:
        return self._mask.shape[1]

    @property
    def nnz(self) -> int:
        """Number of live blocks."""
        return int(self.entry_rows.size)

    @property
    def density(self) -> float:
        """Fraction of live blocks, ``nnz / (in_blocks * out_blocks)``."""
        total = self._mask.size
        return self.nnz / total if total else 0.0

    @property
    def capacity(self) -> int:
        """Number of storage slots a weight for this layout has (``w.shape[0]``)."""
        return self._capacity

    @property
    def mask(self) -> np.ndarray:
        """A writable numpy bool copy of the block mask."""
        return self._mask.copy()

    @property
    def slots(self) -> np.ndarray:
        """Storage slot of each live entry (row-major order), a copy."""
        return np.array(self.entry_slots, dtype=np.int64)

    def slot_of(self, i: int, j: int) -> int:
        """Storage slot of block ``(i, j)``, or -1 when the block is not live."""
        i, j = operator.index(i), operator.index(j)
        if not (0 <= i < self.in_blocks and 0 <= j < self.out_blocks):
            raise IndexError(f"block ({i}, {j}) is outside the layout's shape {self.shape}")
        return int(self._slot_of[i, j])

    @property
    def slot_table(self) -> np.ndarray:
        """``(in_blocks, out_blocks)`` int64 array: slot of each entry, -1 where dead."""
        return self._slot_of

    def free_slots(self) -> np.ndarray:
        """Storage slots not used by any live block, ascending."""
        used = np.zeros(self._capacity, dtype=bool)
        used[self.entry_slots] = True
        return np.flatnonzero(~used)

    # ------------------------------------------------------------------ editing
    def remove(self, rows, cols) -> "BlockLayout":
        """A new layout without the live blocks ``(rows[k], cols[k])``; other slots unchanged."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        cols = np.atleast_1d(np.asarray(cols, dtype=np.int64))
        self._check_indices(rows, cols)
        if rows.size and not np.all(self._mask[rows, cols]):
            raise ValueError("remove() names a block that is not live")
        mask = self.mask
        mask[rows, cols] = False
        keep = mask[self.entry_rows, self.entry_cols]
        return BlockLayout(mask, self.entry_slots[keep], self._capacity)

    def add(self, rows, cols, slots=None) -> "BlockLayout":
        """A new layout with extra live blocks ``(rows[k], cols[k])`` stored in ``slots[k]``.

        Without ``slots`` the lowest free slots are used; capacity never grows here.
        """
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        cols = np.atleast_1d(np.asarray(cols, dtype=np.int64))
        self._check_indices(rows, cols)
        if rows.size and np.any(self._mask[rows, cols]):
            raise ValueError("add() names a block that is already live")
        if slots is None:
            free = self.free_slots()
            if free.size < rows.size:
                raise ValueError(f"add() needs {rows.size} free slots, the layout has {free.size} (capacity {self._capacity})")
            slots = free[: rows.size]
        slots = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        slot_of = np.array(self._slot_of)
        slot_of[rows, cols] = slots
        mask = self.mask
        mask[rows, cols] = True
        r, c = np.nonzero(mask)
        return BlockLayout(mask, slot_of[r, c], self._capacity)

    def _check_indices(self, rows, cols):
        if rows.shape != cols.shape:
            raise ValueError("rows and cols must have the same length")
        if rows.size and (rows.min() < 0 or cols.min() < 0 or rows.max() >= self.in_blocks
                          or cols.max() >= self.out_blocks):
            raise ValueError(f"block indices out of range for layout shape {self.shape}")

    def compacted(self) -> "BlockLayout":
        """The same mask with slots renumbered 0..nnz-1 in row-major order (capacity = nnz)."""
        return BlockLayout(self._mask)

    # --------------------------------------------------------- (de)serialization
    def state(self) -> dict:
        """Plain-numpy description of the layout (mask, slots, capacity)."""
        return {"mask": self.mask, "slots": self.slots, "capacity": self._capacity}

    @classmethod
    def from_state(cls, state: dict) -> "BlockLayout":
        return cls(state["mask"], state["slots"], state["capacity"])

    def _tables_on(self, device):
        """The index tables as int32 torch tensors on ``device`` (cached per device; for
        the kernels, which trust them: never hand them out)."""
        import torch

        key = str(device)
        tables = self._device_tables.get(key)
        if tables is None:
            names = ("entry_rows", "entry_cols", "entry_slots", "row_ptr", "row_cols",
                     "row_slots", "col_ptr", "col_rows", "col_slots")
            tables = {n: torch.from_numpy(np.array(getattr(self, n))).to(device) for n in names}
            self._device_tables[key] = tables
        return tables

    def index_tensor(self, name: str, device="cpu"):
        """One index table (e.g. ``"entry_slots"``) as an int64 torch tensor on ``device``,
        for indexing weights from torch code."""
        import torch

        return torch.tensor(np.asarray(getattr(self, name)), dtype=torch.long, device=device)

    # ------------------------------------------------------------------- dunder
    def __eq__(self, other):
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (self._capacity == other._capacity and self._mask.shape == other._mask.shape
                and np.array_equal(self._mask, other._mask)
                and np.array_equal(self.entry_slots, other.entry_slots))

    def __hash__(self):
        return hash((self._mask.shape, self._mask.tobytes(), self.entry_slots.tobytes(), self._capacity))

    def __repr__(self):
        return (f"BlockLayout(shape={self.shape}, nnz={self.nnz}, density={self.density:.3f}, "
                f"capacity={self._capacity})")

    def __getstate__(self):
        return self.state()

    def __setstate__(self, state):
        self.__init__(state["mask"], state["slots"], state["capacity"])
