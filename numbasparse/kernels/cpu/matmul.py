"""Block-sparse matmul on CPUs: host functions around the programs of
:mod:`.matmul_forward` and :mod:`.matmul_backward`.

Shapes: ``x (N, C)``, ``dy``/``y (N, K)``, ``w (capacity, B, B)`` with
``C = in_blocks*B`` and ``K = out_blocks*B``; block ``w[s]`` of live entry ``(i, j)``
maps ``x[:, iB:(i+1)B]`` into ``y[:, jB:(j+1)B]``.  All arrays C-contiguous and of one
dtype (float32, float64, or float16 - and bfloat16 for torch tensors through
:mod:`numbasparse.backend`, numpy having no such dtype); index tables int32.  The
16-bit formats are computed in float32 (widened on load, rounded to nearest even on
store, accumulated in float32 registers).

The public functions take numpy arrays and check everything (shapes, dtypes, table
ranges) before a kernel runs: a bad argument raises, it never reaches compiled code.
:mod:`numbasparse.backend` calls the unchecked ``_run_*``/``_layout_*`` functions with torch tensors
and the tables of a :class:`~numbasparse.layout.BlockLayout` (valid by construction).
"""
from __future__ import annotations

import threading

import numpy as np

from ..checks import check_distinct_slots, check_no_overlap
from . import runtime
from .args import make_block, pair
from .formats import accumulator_type
from .matmul_backward import backward_program
from .matmul_forward import forward_program, tile_extra
from .panels import DIRECT_ROWS, MAX_CHUNK, row_multiple
from .notice import compiling
from .packed_weights import column_ordered

__all__ = ["forward", "backward_data", "backward_weight", "BLOCK_SIZES"]

BLOCK_SIZES = (8, 16, 32)
_DTYPES = ("float32", "float64", "float16")

# ------------------------------------------------------------------ scratch
_local = threading.local()
ALIGN = 64   # bytes: a cache line


def _scratch(name: str, size: int, dtype_name: str) -> tuple:
    """``(address, length)`` of a reusable 1-D scratch array of at least ``size``
    elements, per Python thread (fresh pages on every call would cost a page fault
    per 4 KiB).  It starts on a 64-byte boundary, so that vector loads from it never
    straddle two cache lines (numpy only promises 16).  It lives until a larger one
    replaces it."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype_name)
    entry = buffers.get(key)
    if entry is None or entry[1] < size:
        itemsize = np.dtype(dtype_name).itemsize
        raw = np.empty(max(int(size), 1) + ALIGN // itemsize, dtype=dtype_name)
        start = (-raw.__array_interface__["data"][0] % ALIGN) // itemsize
        buf = raw[start:start + max(int(size), 1)]
        entry = buffers[key] = (buf.__array_interface__["data"][0], buf.size, buf)
    return entry[0], entry[1]


def _table_pairs(layout, names) -> list:
    """``(address, length)`` of a layout's index tables, cached on the layout (its
    tables are immutable)."""
    cache = layout._device_tables
    key = ("cpu",) + names
    found = cache.get(key)
    if found is None:
        found = cache[key] = [pair(getattr(layout, n)) for n in names]
    return found


def _chunking(n_rows: int, dtype_name: str) -> tuple:
    """``(rows per chunk, chunks)``: chunks of at most MAX_CHUNK rows, as equal as the
    tile height allows."""
    multiple = row_multiple(accumulator_type(dtype_name))
    n_chunks = -(-n_rows // MAX_CHUNK)
    per_chunk = -(-n_rows // n_chunks)
    return -(-per_chunk // multiple) * multiple, n_chunks


def _panel_dtype(dtype_name: str) -> str:
    return np.dtype(accumulator_type(dtype_name)).name


_programs: dict = {}
RUNS_PER_THREAD = 4   # direct forward: each thread takes about this many runs of columns


def _program(kind: str, dtype_name: str, B: int, packed: bool):
    """The compiled program (built on first use, announced if that takes a while)."""
    key = (kind, dtype_name, B, packed)
    found = _programs.get(key)
    if found is None:
        factory = forward_program if kind == "forward" else backward_program
        with compiling(key, f"CPU block-sparse matmul kernels for {dtype_name}, block size {B}"):
            found = _programs[key] = factory(dtype_name, B, packed)
    return found


# --------------------------------------------------------- unchecked launches
_COL_TABLES = ("col_ptr", "col_rows", "col_slots")
_ROW_TABLES = ("row_ptr", "row_cols", "row_slots")
_ENTRY_TABLES = ("entry_rows", "entry_cols", "entry_slots")
_NO_TABLES = [(0, 0)] * 3


def _run_forward(x, w, tables, nnz, B, y, dtype_name, itemsize, bias=None):
    """``y = x @ W (+ bias)``.  ``x``, ``w``, ``y``, ``bias``: numpy arrays or torch CPU
    tensors (C-contiguous); ``tables``: ``(address, length)`` of col_ptr, col_rows,
    col_slots."""
    n, c = x.shape
    k = y.shape[1]
    if n == 0 or k == 0:
        return
    live = nnz * B * B
    threads = runtime.threads_for(2.0 * n * live, live * itemsize)
    none = _scratch("none", 1, "float64")
    if n >= DIRECT_ROWS:
        ncp, n_chunks = _chunking(n, dtype_name)
        panels = _panel_dtype(dtype_name)
        xp = _scratch("xp", n_chunks * ncp * c, panels)
        tiles = _scratch("tiles", threads * (ncp * B + tile_extra(dtype_name, B)), panels)
    else:
        ncp = n_chunks = 0
        xp = tiles = none
    run = max(1, k // (B * threads * RUNS_PER_THREAD))
    block, address = make_block([pair(x), pair(w), *tables, pair(y), xp, tiles,
                                 none if bias is None else pair(bias)],
                                (n, c, k, ncp, n_chunks, threads, int(bias is not None), run))
    runtime._launch(_program("forward", dtype_name, B, n >= DIRECT_ROWS), address, threads)


def _run_backward(x, dy, w, row_tables, entry_tables, nnz, B, dx, dw, dtype_name, itemsize):
    """``dx = dy @ W.T`` (when ``dx`` is not None: needs ``w`` and the by-row tables)
    and ``dw[s] = x_i.T @ dy_j`` at the live slots (when ``dw`` is not None: needs
    ``x`` and the entry tables; other slots untouched).  Tables as in :func:`_run_forward`."""
    n, k = dy.shape
    want_dx, want_dw = dx is not None, dw is not None
    if n == 0:
        return
    c = dx.shape[1] if want_dx else x.shape[1]
    live = nnz * B * B * (int(want_dx) + int(want_dw))
    threads = runtime.threads_for(2.0 * n * live, live * itemsize)
    none = _scratch("none", 1, "float64")
    if n >= DIRECT_ROWS:
        ncp, n_chunks = _chunking(n, dtype_name)
        panels = _panel_dtype(dtype_name)
        xp = _scratch("xp", n_chunks * ncp * c, panels) if want_dw else none
        dyp = _scratch("dyp", n_chunks * ncp * k, panels) if want_dw else none
        dyt = _scratch("dyt", n_chunks * ncp * k, panels) if want_dx else none
        tiles = _scratch("tiles", threads * (ncp * B + tile_extra(dtype_name, B)), panels) if want_dx else none
    else:
        ncp = n_chunks = 0
        xp = dyp = dyt = tiles = none
    block, address = make_block(
        [pair(x) if want_dw else none, pair(dy), pair(w) if want_dx else none,
         *(row_tables if want_dx else _NO_TABLES), *(entry_tables if want_dw else _NO_TABLES),
         pair(dx) if want_dx else none, pair(dw) if want_dw else none, xp, dyp, dyt, tiles],
        (n, c, k, ncp, n_chunks, threads, int(want_dx), int(want_dw)))
    runtime._launch(_program("backward", dtype_name, B, n >= DIRECT_ROWS), address, threads)


def _layout_forward(x, w, layout, B, y, dtype_name, itemsize, bias=None):
    """:func:`_run_forward` with a :class:`~numbasparse.layout.BlockLayout`'s tables
    (torch tensors; with few rows, on a column-ordered copy of an unchanged weight)."""
    tables = _table_pairs(layout, _COL_TABLES)
    if x.shape[0] < DIRECT_ROWS and hasattr(w, "_version"):   # a torch tensor
        w, col_slots = column_ordered(w, layout)
        if col_slots is not layout.col_slots:
            tables = [tables[0], tables[1], pair(col_slots)]
    _run_forward(x, w, tables, layout.nnz, B, y, dtype_name, itemsize, bias)


def _layout_backward(x, dy, w, layout, B, dx, dw, dtype_name, itemsize):
    """:func:`_run_backward` with a :class:`~numbasparse.layout.BlockLayout`'s tables."""
    _run_backward(x, dy, w, _table_pairs(layout, _ROW_TABLES), _table_pairs(layout, _ENTRY_TABLES), layout.nnz, B,
                 dx, dw, dtype_name, itemsize)


# ------------------------------------------------------------- checked API
def forward(x, w, col_ptr, col_rows, col_slots, block_size, y):
    """y (N, K) = x (N, C) @ W; every element of y is written (numpy arrays)."""
    B, dtype_name = _check_operands(block_size, {"x": x, "w": w, "y": y})
    n, c = _matrix("x", x, B)
    _rows_match("y", y, n)
    k = _matrix("y", y, B)[1]
    _check_tables("col", col_ptr, col_rows, col_slots, k // B, c // B, w.shape[0])
    _run_forward(x, w, [pair(col_ptr), pair(col_rows), pair(col_slots)], col_rows.shape[0], B, y, dtype_name,
                x.itemsize)


def backward_data(dy, w, row_ptr, row_cols, row_slots, block_size, dx):
    """dx (N, C) = dy (N, K) @ W^T; every element of dx is written (numpy arrays)."""
    B, dtype_name = _check_operands(block_size, {"dy": dy, "w": w, "dx": dx})
    n, k = _matrix("dy", dy, B)
    _rows_match("dx", dx, n)
    c = _matrix("dx", dx, B)[1]
    _check_tables("row", row_ptr, row_cols, row_slots, c // B, k // B, w.shape[0])
    _run_backward(None, dy, w, [pair(row_ptr), pair(row_cols), pair(row_slots)], None, row_cols.shape[0], B, dx,
                 None, dtype_name, dy.itemsize)


def backward_weight(x, dy, entry_rows, entry_cols, entry_slots, block_size, dw):
    """dw[s] = x[:, iB:(i+1)B]^T @ dy[:, jB:(j+1)B] at live slots; dead slots untouched.

    No slot may appear twice in ``entry_slots`` (a slot's gradient is written by one task).
    """
    B, dtype_name = _check_operands(block_size, {"x": x, "dy": dy, "dw": dw})
    n, c = _matrix("x", x, B)
    _rows_match("dy", dy, n)
    k = _matrix("dy", dy, B)[1]
    _check_entries(entry_rows, entry_cols, entry_slots, c // B, k // B, dw.shape[0])
    if n == 0:
        dw[entry_slots] = 0
        return
    _run_backward(x, dy, None, None, [pair(entry_rows), pair(entry_cols), pair(entry_slots)], entry_rows.shape[0],
                 B, None, dw, dtype_name, x.itemsize)


# ------------------------------------------------------------------- checks
def _check_operands(block_size, arrays):
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or int(block_size) not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    B = int(block_size)
    dtype_name = None
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"{name} has dtype {a.dtype}; supported dtypes are float32, float64 and float16")
        if dtype_name is None:
            dtype_name = a.dtype.name
        elif a.dtype.name != dtype_name:
            raise TypeError("dtype mismatch: " + ", ".join(f"{n}={v.dtype}" for n, v in arrays.items()))
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if name in ("w", "dw"):
            if a.ndim != 3 or a.shape[1:] != (B, B):
                raise ValueError(f"{name} must have shape (capacity, {B}, {B}), got {a.shape}")
        elif a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, features), got shape {a.shape}")
    for name in ("y", "dx", "dw"):
        if name in arrays and not arrays[name].flags.writeable:
            raise ValueError(f"{name} is read-only")
    check_no_overlap(arrays)
    return B, dtype_name


def _matrix(name, a, B):
    if a.shape[1] % B:
        raise ValueError(f"{name} has {a.shape[1]} features, not a multiple of block_size {B}")
    return a.shape


def _rows_match(name, a, n):
    if a.shape[0] != n:
        raise ValueError(f"row mismatch: {name} has {a.shape[0]} rows, expected {n}")


def _table(name, t, length=None):
    if not isinstance(t, np.ndarray) or t.dtype != np.int32 or t.ndim != 1 or not t.flags.c_contiguous:
        raise TypeError(f"{name} must be a contiguous 1-D int32 numpy array")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has length {t.shape[0]}, expected {length}")


def _check_tables(kind, ptr, idx, slots, groups, others, capacity):
    _table(f"{kind}_ptr", ptr, groups + 1)
    _table(f"{kind} indices", idx)
    _table(f"{kind}_slots", slots, idx.shape[0])
    if ptr[0] != 0 or ptr[-1] != idx.shape[0] or np.any(np.diff(ptr) < 0):
        raise ValueError(f"{kind}_ptr must rise from 0 to the number of entries ({idx.shape[0]})")
    _in_range(f"{kind} indices", idx, others, "blocks")
    _in_range(f"{kind}_slots", slots, capacity, "weight slots")


def _check_entries(rows, cols, slots, in_blocks, out_blocks, capacity):
    _table("entry_rows", rows)
    _table("entry_cols", cols, rows.shape[0])
    _table("entry_slots", slots, rows.shape[0])
    _in_range("entry_rows", rows, in_blocks, "input blocks")
    _in_range("entry_cols", cols, out_blocks, "output blocks")
    _in_range("entry_slots", slots, capacity, "weight slots")
    check_distinct_slots("entry_slots", slots)


def _in_range(name, t, bound, what):
    if t.size and (t.min() < 0 or t.max() >= bound):
        raise ValueError(f"{name} must lie in [0, {bound}) ({bound} {what}), got values in "
                         f"[{t.min()}, {t.max()}]")
