"""The CPU matmul programs: every path (direct rows, packed chunks, several unequal
chunks, fused bias) against a float64 dense reference; the thread runtime (torch's
OpenMP team, the Python thread-pool fallback, forked children, concurrent callers);
weights changed between calls; and argument checks of the public kernel functions."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import numbasparse
from numbasparse import BlockLayout, block_sparse_matmul
from numbasparse.kernels.cpu import matmul as cpu_matmul
from numbasparse.kernels.cpu import runtime
from numbasparse.kernels.cpu.panels import DIRECT_ROWS, MAX_CHUNK

from helpers import mask_with_empty, permuted_layout, run_in_forked_child

IN_BLOCKS, OUT_BLOCKS = 5, 4
# Rows: direct programs below DIRECT_ROWS, packed at and above it, ragged last tiles,
# and more than MAX_CHUNK rows (several chunks of unequal valid rows).
ROWS = (1, 5, DIRECT_ROWS - 1, DIRECT_ROWS, 33, 100, MAX_CHUNK + 1, 2 * MAX_CHUNK + 37)


def _case(B, dtype, seed, extra=3):
    """A layout with an empty block row (1) and column (2), live blocks in permuted
    slots of a storage with ``extra`` dead slots, and its float64 dense weight."""
    mask = mask_with_empty(IN_BLOCKS, OUT_BLOCKS, 1, 2, density=0.6, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=extra, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    w = rng.standard_normal((capacity, B, B)).astype(dtype)
    w[layout.free_slots()] = np.nan  # dead slots must never be read
    dense = np.zeros((IN_BLOCKS * B, OUT_BLOCKS * B))
    for (i, j), s in zip(zip(*np.nonzero(mask)), slots):
        dense[i * B:(i + 1) * B, j * B:(j + 1) * B] = w[s]
    return layout, w, dense


def _close(got, ref, dtype, what):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{what}: NaN/inf (an element was not written, or a dead slot was read)"
    tol = 1e-5 if dtype == np.float32 else 1e-12
    scale = max(float(np.abs(ref).max(initial=0.0)), 1.0)
    err = float(np.abs(got - ref).max(initial=0.0))
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def _run_all(layout, w, x, dy, B, bias=None):
    """y, dx, dw through the public numpy kernel functions (y with the fused bias
    through the unchecked launcher when ``bias`` is given)."""
    n = x.shape[0]
    y = np.full((n, OUT_BLOCKS * B), np.nan, x.dtype)
    dx = np.full_like(x, np.nan)
    dw = np.full_like(w, -7.0)            # dead slots: untouched
    dw[layout.entry_slots] = np.nan       # live slots: must be overwritten
    if bias is None:
        cpu_matmul.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
    else:
        cpu_matmul._layout_forward(x, w, layout, B, y, x.dtype.name, x.itemsize, bias)
    cpu_matmul.backward_data(dy, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, dx)
    cpu_matmul.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw)
    return y, dx, dw


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("B", [8, 16, 32])
@pytest.mark.parametrize("n", ROWS)
def test_programs_vs_dense_reference(n, B, dtype):
    layout, w, dense = _case(B, dtype, seed=7 * n + B)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, IN_BLOCKS * B)).astype(dtype)
    dy = rng.standard_normal((n, OUT_BLOCKS * B)).astype(dtype)
    y, dx, dw = _run_all(layout, w, x, dy, B)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    _close(y, x64 @ dense, dtype, "y")
    _close(dx, dy64 @ dense.T, dtype, "dx")
    for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
        _close(dw[s], x64[:, i * B:(i + 1) * B].T @ dy64[:, j * B:(j + 1) * B], dtype, f"dw[{s}]")
    assert np.all(dw[layout.free_slots()] == -7.0)
    assert np.all(y[:, 2 * B:3 * B] == 0) and np.all(dx[:, B:2 * B] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 3, DIRECT_ROWS, 70])
def test_fused_bias(n, dtype):
    B = 16
    layout, w, dense = _case(B, dtype, seed=n)
    rng = np.random.default_rng(n + 1)
    x = rng.standard_normal((n, IN_BLOCKS * B)).astype(dtype)
    bias = rng.standard_normal(OUT_BLOCKS * B).astype(dtype)
    y, _, _ = _run_all(layout, w, x, np.zeros((n, OUT_BLOCKS * B), dtype), B, bias=bias)
    _close(y, x.astype(np.float64) @ dense + bias, dtype, "y + bias")
    assert np.array_equal(y[:, 2 * B:3 * B], np.broadcast_to(bias[2 * B:3 * B], (n, B)))  # empty column: the bias


@pytest.mark.parametrize("n", [3, 40])
def test_functional_bias_and_its_gradient(n):
    B = 8
    layout, w_np, dense = _case(B, np.float64, seed=3)
    w = torch.from_numpy(np.nan_to_num(w_np)).requires_grad_()
    x = torch.randn(n, IN_BLOCKS * B, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(OUT_BLOCKS * B, dtype=torch.float64, requires_grad=True)
    y = block_sparse_matmul(x, w, layout, bias=bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = x.detach() @ torch.from_numpy(dense) + bias.detach()
    assert torch.allclose(y, ref, rtol=0, atol=1e-12)
    assert torch.allclose(bias.grad, dy.sum(0), rtol=0, atol=1e-12)
    assert torch.allclose(x.grad, dy @ torch.from_numpy(dense).t(), rtol=0, atol=1e-12)
    with torch.no_grad():  # no autograd node: same numbers
        assert torch.equal(block_sparse_matmul(x, w, layout, bias=bias), y.detach())
    with pytest.raises(ValueError, match="bias must have shape"):
        block_sparse_matmul(x, w, layout, bias=bias[:-1])
    with pytest.raises(TypeError, match="bias"):
        block_sparse_matmul(x, w, layout, bias=bias.float())


# ----------------------------------------------------------------- thread runtime
@pytest.fixture
def always_parallel(monkeypatch):
    """Every call, however small, on several threads."""
    monkeypatch.setattr(runtime, "SERIAL_WORK", 0)
    yield
    numbasparse.set_num_threads(None)


def _training_results(n=300, B=16, seed=11):
    layout, w_np, _ = _case(B, np.float32, seed=seed)
    w = torch.from_numpy(np.nan_to_num(w_np)).requires_grad_()
    x = torch.randn(n, IN_BLOCKS * B, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    y = block_sparse_matmul(x, w, layout)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("threads", [2, 3])
def test_bit_identical_for_any_thread_count(always_parallel, threads):
    numbasparse.set_num_threads(1)
    serial = _training_results()
    numbasparse.set_num_threads(threads)
    assert runtime.threads_for(1e9) == threads
    for a, b in zip(serial, _training_results()):
        assert torch.equal(a, b)


def test_python_thread_pool_fallback(always_parallel, monkeypatch):
    """Without torch's OpenMP library the programs run on a pool of Python threads."""
    numbasparse.set_num_threads(2)
    reference = _training_results(seed=12)
    monkeypatch.setattr(runtime, "_team_launcher", lambda: None)
    assert runtime.backend_name() == "threads"
    for a, b in zip(reference, _training_results(seed=12)):
        assert torch.equal(a, b)


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="this torch build does not use OpenMP")
def test_uses_torchs_openmp_team_when_available():
    assert runtime.backend_name() == "openmp"


def test_concurrent_callers(always_parallel):
    """Several Python threads calling the kernels at once each get their own result."""
    numbasparse.set_num_threads(2)
    expected = {seed: _training_results(n=64, seed=seed) for seed in range(4)}
    got, errors = {}, []

    def worker(seed):
        try:
            for _ in range(5):
                got[seed] = _training_results(n=64, seed=seed)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed, results in expected.items():
        for a, b in zip(results, got[seed]):
            assert torch.equal(a, b)


def _child_result():
    return [t.numpy() for t in _training_results(seed=13)]


def test_forked_child_runs_the_kernels(always_parallel):
    """After the parent used the kernels (and OpenMP), a forked child still can."""
    numbasparse.set_num_threads(2)
    parent = _training_results(seed=13)
    for a, b in zip(parent, run_in_forked_child(_child_result)):
        assert np.array_equal(a.numpy(), b)


class _SparseCollate:
    """A collate function that runs a block-sparse layer (in the worker processes)."""

    def __init__(self):
        layout = numbasparse.layouts.random(4, 4, 0.5, seed=0)
        self.layer = numbasparse.BlockSparseLinear(64, 64, layout, block_size=16)

    def __call__(self, rows):
        with torch.no_grad():
            return self.layer(torch.stack(rows))


def test_dataloader_fork_workers():
    collate = _SparseCollate()
    data = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    expected = [collate(data[i:i + 6]) for i in range(0, 24, 6)]  # the parent uses the kernels first
    loader = torch.utils.data.DataLoader(data, batch_size=6, num_workers=2, collate_fn=collate,
                                         multiprocessing_context="fork")
    for got, ref in zip(loader, expected):
        assert torch.equal(got, ref)


def test_set_num_threads_validates_and_reads_back():
    try:
        numbasparse.set_num_threads(1)
        assert numbasparse.get_num_threads() == 1
        numbasparse.set_num_threads(None)
        assert numbasparse.get_num_threads() == torch.get_num_threads()
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="positive integer"):
                numbasparse.set_num_threads(bad)
    finally:
        numbasparse.set_num_threads(None)


# ---------------------------------------------------- weights changed between calls
def _layer_and_reference(seed=0):
    layout = numbasparse.layouts.random(4, 3, 0.5, seed=seed)
    layer = numbasparse.BlockSparseLinear(4 * 16, 3 * 16, layout, block_size=16).double()
    x = torch.randn(20, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def reference():
        return x @ layer.to_dense().detach() + layer.bias.detach()

    return layer, x, reference


def test_weight_changed_in_place_is_seen():
    layer, x, reference = _layer_and_reference()
    for n in (1, 20):  # direct and packed programs
        assert torch.allclose(layer(x[:n]), reference()[:n], atol=1e-12)
    with torch.no_grad():
        layer.weight.mul_(-3.0)
        layer.weight[0, 0, 0] = 42.0
    for n in (1, 20):
        assert torch.allclose(layer(x[:n]), reference()[:n], atol=1e-12)


def test_optimizer_step_is_seen():
    layer, x, reference = _layer_and_reference(seed=1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        before = layer(x).detach()
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = layer(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, reference(), atol=1e-12)


def test_column_ordered_weight_copies_follow_the_weight(monkeypatch):
    """Few rows: after a weight is seen unchanged, the forward pass reads a
    column-ordered copy; any change (in place, optimizer step, new layout) is seen by
    the next call, and the copy goes away with the weight."""
    import gc

    from numbasparse.kernels.cpu import packed_weights

    monkeypatch.setattr(packed_weights, "MIN_BYTES", 0)
    layer, x, reference = _layer_and_reference(seed=3)
    x = x[:2]
    with torch.no_grad():
        for _ in range(3):  # the second call makes the copy, the third uses it
            assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        entry = packed_weights._entries[id(layer.weight)]
        assert entry[3] is not None and entry[3].data_ptr() != layer.weight.data_ptr()
        layer.weight.add_(1.0)
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        layout = layer.layout
        layer.set_layout(layout.remove(layout.entry_rows[:2], layout.entry_cols[:2]))
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        # new data under the same tensor without a version bump (.data =, .float())
        layer.weight.data = layer.weight.data * 2
        assert torch.allclose(layer(x), reference()[:2], atol=1e-12)
        layer.float()
        expected = x.float() @ layer.to_dense().detach() + layer.bias.detach()
        assert torch.allclose(layer(x.float()), expected, atol=1e-5)
    key = id(layer.weight)
    del layer, optimizer, reference  # the reference closure holds the layer too
    gc.collect()
    assert key not in packed_weights._entries


def test_set_layout_is_seen():
    layer, x, reference = _layer_and_reference(seed=2)
    layer(x)
    layout = layer.layout
    smaller = layout.remove(layout.entry_rows[:1], layout.entry_cols[:1])
    layer.set_layout(smaller)
    assert torch.allclose(layer(x), reference(), atol=1e-12)
    assert torch.allclose(layer(x[:1]), reference()[:1], atol=1e-12)


# ------------------------------------------------------- public kernel functions
def _valid_args(B=8, n=4):
    layout, w, _ = _case(B, np.float32, seed=5)
    w = np.nan_to_num(w)
    x = np.ones((n, IN_BLOCKS * B), np.float32)
    y = np.empty((n, OUT_BLOCKS * B), np.float32)
    return layout, w, x, y


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(block_size=12), ValueError, "block_size must be one of"),
    (lambda a: a.update(x=a["x"].astype(np.float64)), TypeError, "dtype mismatch"),
    (lambda a: a.update(x=a["x"].astype(np.int32)), TypeError, "supported dtypes"),
    (lambda a: a.update(x=torch.ones(4, 40)), TypeError, "numpy array"),
    (lambda a: a.update(x=np.ones((4, 80), np.float32)[:, ::2]), ValueError, "C-contiguous"),
    (lambda a: a.update(x=np.ones((4, 41), np.float32)), ValueError, "not a multiple of block_size"),
    (lambda a: a.update(y=np.empty((5, 32), np.float32)), ValueError, "row mismatch"),
    (lambda a: a.update(w=a["w"][:, :4, :4].copy()), ValueError, "capacity, 8, 8"),
    (lambda a: a.update(col_rows=a["col_rows"] + 10), ValueError, r"col indices must lie in \[0, 5\)"),
    (lambda a: a.update(col_slots=-a["col_slots"] - 1), ValueError, "col_slots must lie in"),
    (lambda a: a.update(col_ptr=a["col_ptr"][::-1].copy()), ValueError, "col_ptr must rise"),
    (lambda a: a.update(col_ptr=a["col_ptr"][:-1].copy()), ValueError, "col_ptr has length"),
    (lambda a: a.update(col_rows=a["col_rows"].astype(np.int64)), TypeError, "int32"),
    (lambda a: a.update(y=np.empty((4, 24), np.float32)), ValueError, "col_ptr has length"),
])
def test_forward_checks_its_arguments(change, error, match):
    layout, w, x, y = _valid_args()
    args = {"x": x, "w": w, "col_ptr": np.array(layout.col_ptr), "col_rows": np.array(layout.col_rows),
            "col_slots": np.array(layout.col_slots), "block_size": 8, "y": y}
    change(args)
    with pytest.raises(error, match=match):
        cpu_matmul.forward(**args)


def test_backward_functions_check_their_tables():
    layout, w, x, _ = _valid_args()
    dy = np.ones((4, OUT_BLOCKS * 8), np.float32)
    dx = np.empty_like(x)
    dw = np.zeros_like(w)
    bad_cols = np.array(layout.row_cols) + OUT_BLOCKS
    with pytest.raises(ValueError, match="row indices must lie in"):
        cpu_matmul.backward_data(dy, w, layout.row_ptr, bad_cols, layout.row_slots, 8, dx)
    bad_slots = np.array(layout.entry_slots) + w.shape[0]
    with pytest.raises(ValueError, match="entry_slots must lie in"):
        cpu_matmul.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, bad_slots, 8, dw)
    with pytest.raises(ValueError, match="entry_cols has length"):
        cpu_matmul.backward_weight(x, dy, layout.entry_rows, layout.entry_cols[:-1], layout.entry_slots, 8, dw)
    read_only = np.zeros_like(w)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cpu_matmul.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, 8, read_only)


def test_empty_inputs_write_what_they_must():
    layout, w, _, _ = _valid_args()
    x = np.empty((0, IN_BLOCKS * 8), np.float32)
    dy = np.empty((0, OUT_BLOCKS * 8), np.float32)
    dw = np.full_like(w, 5.0)
    cpu_matmul.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, 8, dw)
    assert np.all(dw[layout.entry_slots] == 0) and np.all(dw[layout.free_slots()] == 5.0)
    empty = BlockLayout(np.zeros((IN_BLOCKS, OUT_BLOCKS), bool))
    y = np.full((3, OUT_BLOCKS * 8), np.nan, np.float32)
    cpu_matmul.forward(np.ones((3, IN_BLOCKS * 8), np.float32), np.zeros((0, 8, 8), np.float32),
                       empty.col_ptr, empty.col_rows, empty.col_slots, 8, y)
    assert np.all(y == 0)
