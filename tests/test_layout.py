"""BlockLayout (properties, kernel tables, immutability, editing, serialization) and the
layout generators of numbasparse.layouts."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numbasparse import BlockLayout, layouts

TABLES = ("entry_rows", "entry_cols", "entry_slots", "row_ptr", "row_cols", "row_slots",
          "col_ptr", "col_rows", "col_slots")

MASK = np.array([[1, 0, 1, 0],
                 [0, 0, 0, 0],
                 [1, 1, 0, 0]], dtype=bool)   # nnz 4, empty row 1, empty column 3


def check_tables(layout, mask, slots, capacity):
    """Every kernel table agrees with the mask and the slots the test chose."""
    mask = np.asarray(mask, dtype=bool)
    slots = np.asarray(slots)
    rows, cols = np.nonzero(mask)              # row-major order
    nnz = rows.size
    in_blocks, out_blocks = mask.shape
    assert layout.shape == mask.shape
    assert (layout.in_blocks, layout.out_blocks) == mask.shape
    assert layout.nnz == nnz
    assert layout.capacity == capacity
    assert layout.density == pytest.approx(nnz / mask.size if mask.size else 0.0)
    for name in TABLES:
        t = getattr(layout, name)
        assert isinstance(t, np.ndarray) and t.dtype == np.int32, name
        assert t.flags.c_contiguous, name
    np.testing.assert_array_equal(layout.entry_rows, rows)
    np.testing.assert_array_equal(layout.entry_cols, cols)
    np.testing.assert_array_equal(layout.entry_slots, slots)
    np.testing.assert_array_equal(layout.slots, slots)
    # by row
    assert layout.row_ptr.shape == (in_blocks + 1,)
    assert layout.row_ptr[0] == 0 and layout.row_ptr[-1] == nnz
    assert np.all(np.diff(layout.row_ptr) >= 0)
    expect = {(int(i), int(j)): int(s) for i, j, s in zip(rows, cols, slots)}
    seen = {}
    for i in range(in_blocks):
        for e in range(layout.row_ptr[i], layout.row_ptr[i + 1]):
            key = (i, int(layout.row_cols[e]))
            assert key not in seen
            seen[key] = int(layout.row_slots[e])
    assert seen == expect
    # by column
    assert layout.col_ptr.shape == (out_blocks + 1,)
    assert layout.col_ptr[0] == 0 and layout.col_ptr[-1] == nnz
    assert np.all(np.diff(layout.col_ptr) >= 0)
    seen = {}
    for j in range(out_blocks):
        for e in range(layout.col_ptr[j], layout.col_ptr[j + 1]):
            key = (int(layout.col_rows[e]), j)
            assert key not in seen
            seen[key] = int(layout.col_slots[e])
    assert seen == expect
    # slot lookups
    table = layout.slot_table
    assert table.shape == mask.shape
    for i in range(in_blocks):
        for j in range(out_blocks):
            s = expect.get((i, j), -1)
            assert layout.slot_of(i, j) == s
            assert table[i, j] == s
    np.testing.assert_array_equal(layout.free_slots(),
                                  np.setdiff1d(np.arange(capacity), slots))


# ------------------------------------------------------------------ properties
def test_properties_default_slots():
    layout = BlockLayout(MASK)
    assert layout.shape == (3, 4)
    assert layout.nnz == 4
    assert layout.density == pytest.approx(4 / 12)
    assert layout.capacity == 4
    check_tables(layout, MASK, np.arange(4), 4)
    assert layout.free_slots().size == 0


def test_properties_permuted_slots_with_capacity():
    slots = [6, 2, 0, 4]
    layout = BlockLayout(MASK, slots=slots, capacity=8)
    check_tables(layout, MASK, slots, 8)
    np.testing.assert_array_equal(layout.free_slots(), [1, 3, 5, 7])
    assert "nnz=4" in repr(layout) and "capacity=8" in repr(layout)


def test_capacity_defaults_to_max_slot_plus_one():
    layout = BlockLayout(MASK, slots=[0, 5, 1, 2])
    assert layout.capacity == 6
    np.testing.assert_array_equal(layout.free_slots(), [3, 4])


@pytest.mark.parametrize("convert", [
    lambda m: m,
    lambda m: m.astype(np.int64),
    lambda m: m.astype(np.float32),
    lambda m: m.astype(np.uint8),
    lambda m: m.astype(int).tolist(),
    lambda m: torch.from_numpy(m),
    lambda m: torch.from_numpy(m.astype(np.float64)),
    lambda m: BlockLayout(m),
], ids=["bool", "int64", "float32", "uint8", "list", "torch-bool", "torch-float", "layout"])
def test_mask_inputs(convert):
    layout = BlockLayout(convert(MASK))
    check_tables(layout, MASK, np.arange(4), 4)
    assert layout == BlockLayout(MASK)


def test_mask_property_is_a_copy():
    layout = BlockLayout(MASK)
    m = layout.mask
    assert m.dtype == np.bool_
    np.testing.assert_array_equal(m, MASK)
    m[:] = True
    m2 = layout.mask
    np.testing.assert_array_equal(m2, MASK)
    assert layout.nnz == 4
    s = layout.slots
    s[:] = 0
    np.testing.assert_array_equal(layout.slots, np.arange(4))


def test_input_mask_is_copied():
    src = MASK.copy()
    layout = BlockLayout(src)
    src[1, 1] = True
    src[0, 0] = False
    np.testing.assert_array_equal(layout.mask, MASK)
    check_tables(layout, MASK, np.arange(4), 4)
    assert src.flags.writeable  # the caller's array is left alone


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_slots_argument_is_neither_aliased_nor_frozen(dtype):
    """The layout must own its slot tables: changing the caller's slots array afterwards
    (or the array it is a view of) must not change the layout, and the caller's array
    must stay writable."""
    base = np.array([6, 2, 0, 4], dtype=dtype)
    view = base[:]
    layout = BlockLayout(MASK, slots=view, capacity=8)
    base[0] = 1  # the base stays writable even when the view is frozen
    assert layout.slot_of(0, 0) == 6
    np.testing.assert_array_equal(layout.entry_slots, [6, 2, 0, 4],
                                  err_msg="entry_slots aliases the caller's slots array")
    np.testing.assert_array_equal(layout.row_slots, [6, 2, 0, 4],
                                  err_msg="row_slots aliases the caller's slots array")
    check_tables(layout, MASK, [6, 2, 0, 4], 8)
    assert view.flags.writeable, "BlockLayout made the caller's slots array read-only"


def test_tables_are_read_only():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    for name in TABLES:
        t = getattr(layout, name)
        assert not t.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            t[0] = 3
    with pytest.raises(ValueError, match="read-only"):
        layout.slot_table[0, 0] = 1
    for name in TABLES:  # the kernels trust a layout's tables: they cannot be swapped either
        with pytest.raises(AttributeError):
            setattr(layout, name, np.zeros(4, dtype=np.int32))
        with pytest.raises(ValueError, match="WRITEABLE"):  # nor made writable again
            getattr(layout, name).flags.writeable = True
    check_tables(layout, MASK, [6, 2, 0, 4], 8)


def test_index_tensor_and_device_tables():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    t = layout.index_tensor("entry_slots")
    assert t.dtype == torch.long
    assert t.tolist() == [6, 2, 0, 4]
    tables = layout._tables_on("cpu")
    assert set(tables) == set(TABLES)
    for name in TABLES:
        assert tables[name].dtype == torch.int32
        np.testing.assert_array_equal(tables[name].numpy(), getattr(layout, name))
    assert layout._tables_on("cpu") is tables  # cached


@settings(max_examples=60, deadline=None)
@given(in_blocks=st.integers(0, 6), out_blocks=st.integers(0, 6), extra=st.integers(0, 3),
       seed=st.integers(0, 2**31), density=st.floats(0, 1))
def test_tables_consistent_random(in_blocks, out_blocks, extra, seed, density):
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < density
    nnz = int(mask.sum())
    capacity = nnz + extra
    slots = rng.permutation(capacity)[:nnz]
    layout = BlockLayout(mask, slots=slots.copy(), capacity=capacity)
    check_tables(layout, mask, slots, capacity)


def test_empty_and_degenerate_masks():
    check_tables(BlockLayout(np.zeros((3, 2))), np.zeros((3, 2)), [], 0)
    layout = BlockLayout(np.zeros((3, 2)), capacity=4)
    check_tables(layout, np.zeros((3, 2)), [], 4)
    np.testing.assert_array_equal(layout.free_slots(), [0, 1, 2, 3])
    zero_rows = BlockLayout(np.zeros((0, 5)))
    assert zero_rows.shape == (0, 5) and zero_rows.nnz == 0 and zero_rows.density == 0.0
    assert zero_rows.col_ptr.tolist() == [0] * 6


# ------------------------------------------------------------------ editing
def test_remove_keeps_other_slots_and_capacity():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    smaller = layout.remove([0, 2], [2, 0])        # blocks (0,2) slot 2 and (2,0) slot 0
    expect = MASK.copy()
    expect[0, 2] = expect[2, 0] = False
    check_tables(smaller, expect, [6, 4], 8)
    np.testing.assert_array_equal(smaller.free_slots(), [0, 1, 2, 3, 5, 7])
    check_tables(layout, MASK, [6, 2, 0, 4], 8)    # the original is unchanged


def test_remove_scalar_arguments():
    layout = BlockLayout(MASK)
    smaller = layout.remove(2, 1)
    expect = MASK.copy()
    expect[2, 1] = False
    check_tables(smaller, expect, [0, 1, 2], 4)


def test_add_uses_lowest_free_slots():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    bigger = layout.add([1, 0], [3, 1])
    expect = MASK.copy()
    expect[1, 3] = expect[0, 1] = True
    # row-major order: (0,0)=6 (0,1)=3 (0,2)=2 (1,3)=1 (2,0)=0 (2,1)=4
    check_tables(bigger, expect, [6, 3, 2, 1, 0, 4], 8)
    check_tables(layout, MASK, [6, 2, 0, 4], 8)


def test_add_with_explicit_slots():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    bigger = layout.add([1], [1], slots=[7])
    expect = MASK.copy()
    expect[1, 1] = True
    check_tables(bigger, expect, [6, 2, 7, 0, 4], 8)


def test_remove_then_add_reuses_slot():
    layout = BlockLayout(MASK)
    again = layout.remove(0, 2).add(0, 2)
    assert again == layout
    moved = layout.remove(0, 2).add(1, 0)
    expect = MASK.copy()
    expect[0, 2] = False
    expect[1, 0] = True
    check_tables(moved, expect, [0, 1, 2, 3], 4)


def test_add_without_free_slot_raises():
    layout = BlockLayout(MASK)
    with pytest.raises(ValueError, match="free slots"):
        layout.add(1, 1)


def test_add_live_and_remove_dead_raise():
    layout = BlockLayout(MASK)
    with pytest.raises(ValueError, match="already live"):
        layout.add(0, 0, slots=[9])
    with pytest.raises(ValueError, match="not live"):
        layout.remove(1, 1)
    with pytest.raises(ValueError, match="same length"):
        layout.remove([0, 0], [0])


def test_compacted():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    compact = layout.compacted()
    check_tables(compact, MASK, np.arange(4), 4)
    check_tables(layout, MASK, [6, 2, 0, 4], 8)
    assert compact != layout
    assert compact == BlockLayout(MASK)


def test_equality_and_hash():
    a = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    b = BlockLayout(MASK.astype(int), slots=np.array([6, 2, 0, 4]), capacity=8)
    assert a == b and hash(a) == hash(b)
    assert a != BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=9)
    assert a != BlockLayout(MASK, slots=[2, 6, 0, 4], capacity=8)
    assert a != BlockLayout(MASK.T)
    assert len({a, b}) == 1


# --------------------------------------------------------------- serialization
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(protocol):
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    layout._tables_on("cpu")  # a populated device cache must not break pickling
    clone = pickle.loads(pickle.dumps(layout, protocol=protocol))
    assert clone == layout
    check_tables(clone, MASK, [6, 2, 0, 4], 8)
    for name in TABLES:
        assert not getattr(clone, name).flags.writeable


def test_copy_and_deepcopy():
    import copy

    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    layout._tables_on("cpu")
    for clone in (copy.copy(layout), copy.deepcopy(layout)):
        assert clone == layout
        check_tables(clone, MASK, [6, 2, 0, 4], 8)


def test_state_round_trip():
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    state = layout.state()
    assert set(state) == {"mask", "slots", "capacity"}
    state["mask"][0, 0] = False  # the state is a copy
    assert layout.mask[0, 0]
    state = layout.state()
    clone = BlockLayout.from_state(state)
    assert clone == layout
    check_tables(clone, MASK, [6, 2, 0, 4], 8)


def test_torch_save_round_trip(tmp_path):
    layout = BlockLayout(MASK, slots=[6, 2, 0, 4], capacity=8)
    torch.save({"layout": layout}, tmp_path / "l.pt")
    clone = torch.load(tmp_path / "l.pt", weights_only=False)["layout"]
    assert clone == layout


# ------------------------------------------------------------------ generators
def _assert_graph_layout(layout, n):
    m = layout.mask
    assert layout.shape == (n, n)
    assert np.array_equal(m, m.T), "not symmetric"
    assert np.all(np.diag(m)), "diagonal not set"
    assert np.all(m.any(axis=0)) and np.all(m.any(axis=1))


def test_random_generator():
    a = layouts.random(12, 10, 0.3, seed=1)
    assert a.shape == (12, 10)
    assert a.nnz == round(0.3 * 120)
    assert a.capacity == a.nnz
    assert a == layouts.random(12, 10, 0.3, seed=1)
    assert a != layouts.random(12, 10, 0.3, seed=2)
    assert layouts.random(4, 5, 0.0, seed=0).nnz == 0
    assert layouts.random(4, 5, 1.0, seed=0).nnz == 20
    assert layouts.random(np.int64(4), np.int64(5), 0.5, seed=np.int64(3)).nnz == 10


def test_random_generator_seed_none_varies():
    draws = {layouts.random(16, 16, 0.5).mask.tobytes() for _ in range(3)}
    assert len(draws) > 1


def test_dense_generator():
    d = layouts.dense(3, 5)
    assert d.shape == (3, 5) and d.nnz == 15 and d.density == 1.0
    assert layouts.dense(4).shape == (4, 4)


def test_block_diagonal_generator():
    d = layouts.block_diagonal(5)
    np.testing.assert_array_equal(d.mask, np.eye(5, dtype=bool))
    g = layouts.block_diagonal(4, 6, groups=2)
    assert g.shape == (4, 6)
    expect = np.zeros((4, 6), dtype=bool)
    expect[:2, :3] = True
    expect[2:, 3:] = True
    np.testing.assert_array_equal(g.mask, expect)
    r = layouts.block_diagonal(6, 3)
    assert r.shape == (6, 3)
    assert np.all(r.mask.sum(axis=1) == 1) and np.all(r.mask.sum(axis=0) == 2)
    with pytest.raises(ValueError, match="groups"):
        layouts.block_diagonal(4, 6, groups=5)


def test_watts_strogatz_generator():
    n, k = 20, 4
    a = layouts.watts_strogatz(n, k, 0.3, seed=5)
    _assert_graph_layout(a, n)
    assert a.nnz == n + n * k  # rewiring keeps the n*k/2 edges; each edge is 2 blocks
    assert a == layouts.watts_strogatz(n, k, 0.3, seed=5)
    assert a != layouts.watts_strogatz(n, k, 0.3, seed=6)
    ring = layouts.watts_strogatz(n, k, 0.0, seed=0)  # p = 0: the ring lattice exactly
    expect = np.eye(n, dtype=bool)
    for i in range(n):
        for d in range(1, k // 2 + 1):
            expect[i, (i + d) % n] = expect[i, (i - d) % n] = True
    np.testing.assert_array_equal(ring.mask, expect)
    np.testing.assert_array_equal(layouts.watts_strogatz(5, 0, 0.5, seed=1).mask, np.eye(5, dtype=bool))


def test_barabasi_albert_generator():
    n, m = 24, 3
    a = layouts.barabasi_albert(n, m, seed=7)
    _assert_graph_layout(a, n)
    assert a.nnz == n + 2 * m * (n - m)  # m edges per new node
    assert a == layouts.barabasi_albert(n, m, seed=7)
    assert a != layouts.barabasi_albert(n, m, seed=8)


def _weight_with_block_norms(norms, B, seed=0):
    """(in, out) weight whose block (i, j) has Frobenius norm norms[i, j]."""
    rng = np.random.default_rng(seed)
    norms = np.asarray(norms, dtype=np.float64)
    w = np.zeros((norms.shape[0] * B, norms.shape[1] * B))
    for i in range(norms.shape[0]):
        for j in range(norms.shape[1]):
            blk = rng.standard_normal((B, B))
            w[i * B:(i + 1) * B, j * B:(j + 1) * B] = blk / np.linalg.norm(blk) * norms[i, j]
    return w


def test_from_dense_density_keeps_largest_blocks():
    B = 8
    norms = np.random.default_rng(3).permutation(np.arange(1, 13)).reshape(3, 4).astype(float)
    w = _weight_with_block_norms(norms, B)
    for density, keep in ((0.25, 3), (0.5, 6), (1.0, 12), (0.01, 1)):
        layout = layouts.from_dense(w, B, density=density)
        assert layout.shape == (3, 4)
        assert layout.nnz == keep
        kept = norms[layout.mask]
        dropped = norms[~layout.mask]
        assert dropped.size == 0 or kept.min() > dropped.max()
    assert layouts.from_dense(w, B, density=0.0).nnz == 0
    # torch input, same answer
    assert layouts.from_dense(torch.from_numpy(w).float(), B, density=0.5) == layouts.from_dense(w, B, density=0.5)


def test_from_dense_threshold_and_default():
    B = 16
    norms = np.array([[0.0, 2.0, 0.5], [3.0, 0.0, 1.0]])
    w = _weight_with_block_norms(norms, B, seed=1)
    np.testing.assert_array_equal(layouts.from_dense(w, B, threshold=1.0 - 1e-9).mask, norms >= 1.0)
    np.testing.assert_array_equal(layouts.from_dense(w, B, threshold=2.5).mask, norms >= 2.5)
    np.testing.assert_array_equal(layouts.from_dense(w, B).mask, norms > 0)


def test_from_dense_ties_broken_by_position():
    B = 8
    w = np.ones((2 * B, 3 * B))
    layout = layouts.from_dense(w, B, density=0.5)
    np.testing.assert_array_equal(layout.mask, [[1, 1, 1], [0, 0, 0]])


def test_block_norms():
    from numbasparse.layouts import block_norms

    norms = np.array([[1.0, 2.0], [0.0, 4.0]])
    w = _weight_with_block_norms(norms, 8, seed=4)
    np.testing.assert_allclose(block_norms(w, 8), norms, rtol=1e-12, atol=1e-12)
