"""Host-side helpers shared by the numba.cuda kernel modules: dtypes of (device) arrays,
read-only transfer of host inputs, layout-table checks and 1-D launch grids.

Layout tables (int arrays) index the float operands inside the kernels, where an
out-of-range value is an illegal memory access on a GPU.  The checked host wrappers
therefore look at every table value before a launch: numpy tables directly, device
tables (numba device arrays, objects exposing ``__cuda_array_interface__``) after a
copy to the host, which synchronizes on the launch stream.  Code that owns tables
valid by construction (a :class:`~numbasparse.layout.BlockLayout`'s) calls the
unchecked launchers and pays none of this.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ..checks import check_distinct_slots

#: Thread-blocks a 1-D grid may hold (``gridDim.x``; ``gridDim.y`` / ``.z`` stop at
#: 65535, so no kernel here uses them).
MAX_GRID_X = 2 ** 31 - 1
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def compute_type(dtype_str: str):
    """The numpy type a kernel accumulates in (and stages through shared memory) for
    arrays of ``dtype_str``: float32 for float16 (loads widen, stores round), else the
    dtype itself."""
    dtype = np.dtype(dtype_str)
    return np.float32 if dtype == np.float16 else dtype.type


# ------------------------------------------------------------------ arrays
def dtype_of(array) -> np.dtype:
    """numpy dtype of a numpy array, numba device array or CUDA-array-interface object."""
    dt = getattr(array, "dtype", None)
    if dt is not None:
        try:
            return np.dtype(dt)
        except TypeError:
            pass
    iface = getattr(array, "__cuda_array_interface__", None) or getattr(array, "__array_interface__", None)
    if iface is None:
        raise TypeError(f"expected a numpy array or a CUDA array, got {type(array).__name__}")
    return np.dtype(iface["typestr"])


def shape_of(name: str, array) -> tuple:
    shape = getattr(array, "shape", None)
    if shape is None:
        iface = getattr(array, "__cuda_array_interface__", None)
        if iface is None:
            raise TypeError(f"{name} must be a numpy array or a CUDA array, got {type(array).__name__}")
        shape = iface["shape"]
    return tuple(int(s) for s in shape)


def host_in(array):
    """Mark host (numpy) inputs read-only for the launch: no copy back after the kernel.

    Device arrays pass through.  Needed for the layout's read-only numpy tables (CUDA
    simulator, or host tables on a real GPU), and saves a copy for the other inputs.
    """
    return cuda.In(array) if isinstance(array, np.ndarray) else array


def check_floats(block_size: int, block_sizes, arrays: dict, ranks: dict) -> np.dtype:
    """Block size, one float dtype for all ``arrays`` (name -> array) and their ranks
    (name -> number of dimensions); returns the dtype."""
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) \
            or int(block_size) not in block_sizes:
        raise ValueError(f"block_size must be one of {block_sizes}, got {block_size!r}")
    dtypes = {name: dtype_of(a) for name, a in arrays.items()}
    dt = next(iter(dtypes.values()))
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"only float32, float64 and float16 are supported, got {dt}")
    if any(d != dt for d in dtypes.values()):
        raise TypeError("dtype mismatch: " + ", ".join(f"{n}={d}" for n, d in dtypes.items()))
    for name, a in arrays.items():
        shape = shape_of(name, a)
        if len(shape) != ranks[name]:
            raise ValueError(f"{name} must be {ranks[name]}-D, got shape {shape}")
    return dt


# ------------------------------------------------------------------ tables
def host_values(name: str, table, stream=0) -> np.ndarray:
    """The values of a 1-D integer table as a numpy array (device tables are copied to
    the host after the work queued on ``stream``)."""
    shape = shape_of(name, table)
    dt = dtype_of(table)
    if dt.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {dt}")
    if len(shape) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {shape}")
    if isinstance(table, np.ndarray):
        return table
    if not hasattr(table, "copy_to_host"):
        table = cuda.as_cuda_array(table)
    values = table.copy_to_host(stream=stream)
    if hasattr(stream, "synchronize"):
        stream.synchronize()
    return values


def _in_range(name: str, values: np.ndarray, bound: int, what: str) -> None:
    if values.size and (int(values.min()) < 0 or int(values.max()) >= bound):
        raise ValueError(f"{name} must lie in [0, {bound}) ({bound} {what}), got values in "
                         f"[{int(values.min())}, {int(values.max())}]")


def check_grouped_tables(kind: str, ptr, idx, slots, groups: int, others: int, capacity: int,
                         stream=0, distinct_slots: bool = False) -> None:
    """Check compressed tables (``col_*`` or ``row_*``): ``ptr`` of length ``groups + 1``
    rising from 0 to ``len(idx)``, ``len(slots) == len(idx)``, every ``idx`` value a
    block of the other side (``< others``) and every slot ``< capacity``; with
    ``distinct_slots`` (tables of a weight gradient, which writes every slot) no slot
    twice."""
    p = host_values(f"{kind}_ptr", ptr, stream)
    i = host_values(f"{kind} indices", idx, stream)
    s = host_values(f"{kind}_slots", slots, stream)
    if p.shape[0] != groups + 1:
        raise ValueError(f"{kind}_ptr has length {p.shape[0]}, expected {groups + 1} ({groups} block groups)")
    if s.shape[0] != i.shape[0]:
        raise ValueError(f"{kind}_slots has length {s.shape[0]}, expected {i.shape[0]} (one per index)")
    if int(p[0]) != 0 or int(p[-1]) != i.shape[0] or np.any(np.diff(p.astype(np.int64)) < 0):
        raise ValueError(f"{kind}_ptr must rise monotonically from 0 to the number of entries ({i.shape[0]})")
    _in_range(f"{kind} indices", i, others, "blocks")
    _in_range(f"{kind}_slots", s, capacity, "weight slots")
    if distinct_slots:
        check_distinct_slots(f"{kind}_slots", s)


def check_entry_tables(rows, cols, slots, in_blocks: int, out_blocks: int, capacity: int, stream=0) -> None:
    """Check entry tables (those of a weight gradient): one length, rows ``< in_blocks``,
    cols ``< out_blocks``, slots ``< capacity`` and no slot twice (the kernel writes
    ``dw[slot]`` once per entry)."""
    r = host_values("entry_rows", rows, stream)
    c = host_values("entry_cols", cols, stream)
    s = host_values("entry_slots", slots, stream)
    if not r.shape[0] == c.shape[0] == s.shape[0]:
        raise ValueError(f"entry tables differ in length: entry_rows {r.shape[0]}, entry_cols {c.shape[0]}, "
                         f"entry_slots {s.shape[0]}")
    _in_range("entry_rows", r, in_blocks, "input blocks")
    _in_range("entry_cols", c, out_blocks, "output blocks")
    _in_range("entry_slots", s, capacity, "weight slots")
    check_distinct_slots("entry_slots", s)


# ------------------------------------------------------------------ grids
def flat_grid(*extents: int) -> tuple:
    """``(blocks,)``: a 1-D grid enumerating ``prod(extents)`` thread-blocks (the kernel
    decomposes ``blockIdx.x`` back into the extents); ``(0,)`` when an extent is 0.

    ValueError when the product exceeds ``MAX_GRID_X``.
    """
    total = 1
    for extent in extents:
        total *= int(extent)
    if total > MAX_GRID_X:
        raise ValueError(f"the launch needs {total} thread-blocks ({' x '.join(str(int(e)) for e in extents)}), "
                         f"more than a CUDA grid holds ({MAX_GRID_X}): split the batch or the layout")
    return (total,)
