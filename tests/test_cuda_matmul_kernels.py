"""numba.cuda block-sparse matmul kernels against a dense float64 numpy reference.

Without a real GPU the kernels run under numba's CUDA simulator (one Python thread per
CUDA thread), so the simulator tests use tiny layouts and small N.  The ``gpu`` class
runs realistic sizes on a real GPU.
"""
import os

import numpy as np
import pytest
import torch

_TORCH_CUDA = torch.cuda.is_available()
if not _TORCH_CUDA:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # before numba.cuda is imported

# numba may already be imported (e.g. pytest's filterwarnings naming a numba warning
# class imports it at startup), and numba.cuda reads numba.core.config, which is read
# once at import: re-read the environment before numba.cuda picks target or simulator.
import numba.core.config as _numba_config  # noqa: E402

_numba_config.reload_config()

from numba import cuda  # noqa: E402

from numbasparse.kernels.cuda import matmul as mm  # noqa: E402
from numbasparse.layout import BlockLayout  # noqa: E402

SIMULATOR = cuda.jit.__module__.startswith("numba.cuda.simulator")
real_gpu = (not SIMULATOR) and _TORCH_CUDA and cuda.is_available()

pytestmark = pytest.mark.skipif(
    not SIMULATOR and not real_gpu,
    reason="no GPU and numba.cuda was imported before NUMBA_ENABLE_CUDASIM=1 could be set",
)

BLOCKS = (8, 16, 32)
DTYPES = (np.float32, np.float64)
RTOL = {np.float32: 1e-4, np.float64: 1e-12}


# ------------------------------------------------------------------------ helpers
def _dense(layout, w, B):
    """float64 dense (C, K) weight assembled from the live blocks."""
    W = np.zeros((layout.in_blocks * B, layout.out_blocks * B))
    for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
        W[i * B:(i + 1) * B, j * B:(j + 1) * B] = w[s]
    return W


def _close(got, ref, dtype):
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert np.all(np.isfinite(got)), "output has NaN/inf: some element was not written"
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(got - ref).max())
    assert err <= RTOL[dtype] * scale, f"max abs error {err} > {RTOL[dtype]} * {scale}"


def _inputs(layout, B, dtype, N, seed):
    rng = np.random.default_rng(seed)
    C, K = layout.in_blocks * B, layout.out_blocks * B
    x = rng.standard_normal((N, C)).astype(dtype)
    dy = rng.standard_normal((N, K)).astype(dtype)
    w = rng.standard_normal((layout.capacity, B, B)).astype(dtype)
    w[layout.free_slots()] = np.nan  # dead slots must never be read
    return x, dy, w


def _run_and_check(layout, B, dtype, N, seed, dead_fill=0.0, stream=0):
    x, dy, w = _inputs(layout, B, dtype, N, seed)
    y = np.full((N, layout.out_blocks * B), np.nan, dtype)     # poison: every element must be written
    dx = np.full_like(x, np.nan)
    dw = np.full_like(w, dead_fill)                              # dead slots: as the caller put them
    dw[layout.entry_slots] = np.nan                              # live slots: poison

    mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y, stream=stream)
    mm.backward_data(dy, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, dx, stream=stream)
    mm.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw,
                       stream=stream)
    if stream != 0:
        stream.synchronize()

    W = _dense(layout, w, B)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    _close(y, x64 @ W, dtype)
    _close(dx, dy64 @ W.T, dtype)
    for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
        _close(dw[s], x64[:, i * B:(i + 1) * B].T @ dy64[:, j * B:(j + 1) * B], dtype)
    dead = layout.free_slots()
    assert np.array_equal(dw[dead], np.full_like(dw[dead], dead_fill)), "dead slots of dw were touched"

    mask = layout.mask
    for j in np.flatnonzero(~mask.any(axis=0)):     # empty block columns -> exact zeros in y
        assert np.all(y[:, j * B:(j + 1) * B] == 0)
    for i in np.flatnonzero(~mask.any(axis=1)):     # empty block rows -> exact zeros in dx
        assert np.all(dx[:, i * B:(i + 1) * B] == 0)
    return y, dx, dw


# Block row 1 and block column 2 are empty; row 0 and column 0 hold two blocks each.
MASK_EMPTY_ROW_COL = np.array([[1, 1, 0],
                               [0, 0, 0],
                               [1, 0, 0]], dtype=bool)


# ------------------------------------------------------------------ simulator tests
@pytest.mark.parametrize("N", [1, 7, 37])   # 37 spans two row tiles (mm.ROW_TILE == 32)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("B", BLOCKS)
def test_empty_row_and_column(B, dtype, N):
    layout = BlockLayout(MASK_EMPTY_ROW_COL)
    seed = 1000 * B + 10 * N + (0 if dtype is np.float32 else 1)
    _run_and_check(layout, B, dtype, N, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("B", BLOCKS)
def test_permuted_slots_with_capacity(B, dtype):
    # 2 in blocks x 3 out blocks (non-square), nnz = 4 in 7 slots, slots permuted.
    mask = np.array([[1, 0, 1],
                     [0, 1, 1]], dtype=bool)
    layout = BlockLayout(mask, slots=np.array([5, 0, 6, 2]), capacity=7)
    assert list(layout.free_slots()) == [1, 3, 4]
    seed = 7 + B + (0 if dtype is np.float32 else 100)
    _run_and_check(layout, B, dtype, 37, seed, dead_fill=-3.5, stream=cuda.stream())


def test_row_tile_is_small_enough():
    assert mm.ROW_TILE < 37  # N = 37 exercises more than one row tile and a ragged last tile


def test_n_zero_is_noop():
    B = 8
    layout = BlockLayout(MASK_EMPTY_ROW_COL)
    x = np.zeros((0, 3 * B), np.float32)
    dy = np.zeros((0, 3 * B), np.float32)
    w = np.ones((layout.capacity, B, B), np.float32)
    y = np.zeros((0, 3 * B), np.float32)
    dx = np.zeros((0, 3 * B), np.float32)
    dw = np.full_like(w, 5.0)
    mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
    mm.backward_data(dy, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, dx)
    mm.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw)
    assert np.all(dw == 5.0)


def test_empty_layout_writes_zeros():
    B, N = 8, 5
    layout = BlockLayout(np.zeros((2, 2), dtype=bool), slots=np.zeros(0, np.int64), capacity=2)
    x, dy, _ = _inputs(layout, B, np.float32, N, seed=3)
    w = np.random.default_rng(4).standard_normal((2, B, B)).astype(np.float32)
    y = np.full((N, 2 * B), np.nan, np.float32)
    dx = np.full_like(x, np.nan)
    dw = np.full_like(w, 2.0)
    mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
    mm.backward_data(dy, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, dx)
    mm.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw)
    assert np.all(y == 0) and np.all(dx == 0) and np.all(dw == 2.0)


def test_device_arrays():
    """Inputs and tables as numba device arrays (what real use passes)."""
    B, N, dtype = 8, 9, np.float64
    layout = BlockLayout(MASK_EMPTY_ROW_COL, slots=np.array([2, 0, 1]), capacity=4)
    x, dy, w = _inputs(layout, B, dtype, N, seed=11)
    t = {n: cuda.to_device(np.array(getattr(layout, n)))
         for n in ("col_ptr", "col_rows", "col_slots", "row_ptr", "row_cols", "row_slots",
                   "entry_rows", "entry_cols", "entry_slots")}
    d_x, d_dy, d_w = cuda.to_device(x), cuda.to_device(dy), cuda.to_device(w)
    d_y = cuda.to_device(np.full((N, 3 * B), np.nan, dtype))
    d_dx = cuda.to_device(np.full_like(x, np.nan))
    dw0 = np.zeros_like(w)
    dw0[layout.entry_slots] = np.nan
    d_dw = cuda.to_device(dw0)
    mm.forward(d_x, d_w, t["col_ptr"], t["col_rows"], t["col_slots"], B, d_y)
    mm.backward_data(d_dy, d_w, t["row_ptr"], t["row_cols"], t["row_slots"], B, d_dx)
    mm.backward_weight(d_x, d_dy, t["entry_rows"], t["entry_cols"], t["entry_slots"], B, d_dw)
    cuda.synchronize()
    W = _dense(layout, w, B)
    _close(d_y.copy_to_host(), x @ W, dtype)
    _close(d_dx.copy_to_host(), dy @ W.T, dtype)
    dw = d_dw.copy_to_host()
    for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
        _close(dw[s], x[:, i * B:(i + 1) * B].T @ dy[:, j * B:(j + 1) * B], dtype)
    assert np.all(dw[layout.free_slots()] == 0)


def test_argument_validation():
    layout = BlockLayout(MASK_EMPTY_ROW_COL)
    B = 8
    x = np.ones((3, 3 * B), np.float32)
    w = np.ones((layout.capacity, B, B), np.float32)
    y = np.zeros((3, 3 * B), np.float32)
    with pytest.raises(ValueError):
        mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, 4, y)
    with pytest.raises(TypeError):
        mm.forward(x, w.astype(np.float64), layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
    with pytest.raises(ValueError):
        mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y[:, :B])
    with pytest.raises(TypeError):
        mm.forward(x.astype(np.int32), w.astype(np.int32), layout.col_ptr, layout.col_rows,
                   layout.col_slots, B, y.astype(np.int32))


# ------------------------------------------------------------------ real GPU tests
def _gpu_layout(in_blocks, out_blocks, seed, spare=10):
    rng = np.random.default_rng(seed)
    mask = rng.random((in_blocks, out_blocks)) < 0.3
    mask[3, :] = False    # an empty block row
    mask[:, 5] = False    # an empty block column
    nnz = int(mask.sum())
    slots = rng.permutation(nnz + spare)[:nnz]
    return BlockLayout(mask, slots=slots, capacity=nnz + spare)


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu, reason="needs a real CUDA GPU (numba.cuda, not the simulator)")
class TestRealGPU:
    B = 32
    FEATURES = 1024

    def _device_run(self, layout, x, dy, w, stream=0):
        B = self.B
        t = {n: cuda.to_device(np.array(getattr(layout, n)))
             for n in ("col_ptr", "col_rows", "col_slots", "row_ptr", "row_cols", "row_slots",
                       "entry_rows", "entry_cols", "entry_slots")}
        d_x, d_dy, d_w = cuda.to_device(x), cuda.to_device(dy), cuda.to_device(w)
        d_y = cuda.to_device(np.full((x.shape[0], layout.out_blocks * B), np.nan, x.dtype))
        d_dx = cuda.to_device(np.full_like(x, np.nan))
        dw0 = np.full_like(w, -2.0)
        dw0[layout.entry_slots] = np.nan
        d_dw = cuda.to_device(dw0)
        mm.forward(d_x, d_w, t["col_ptr"], t["col_rows"], t["col_slots"], B, d_y, stream=stream)
        mm.backward_data(d_dy, d_w, t["row_ptr"], t["row_cols"], t["row_slots"], B, d_dx, stream=stream)
        mm.backward_weight(d_x, d_dy, t["entry_rows"], t["entry_cols"], t["entry_slots"], B, d_dw,
                           stream=stream)
        cuda.synchronize()
        return d_y.copy_to_host(), d_dx.copy_to_host(), d_dw.copy_to_host()

    @pytest.mark.parametrize("N", [256, 301])
    @pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
    def test_realistic(self, dtype, N):
        B = self.B
        nb = self.FEATURES // B
        layout = _gpu_layout(nb, nb, seed=N)
        x, dy, w = _inputs(layout, B, dtype, N, seed=N + 1)
        y, dx, dw = self._device_run(layout, x, dy, w, stream=cuda.stream())
        W = _dense(layout, w, B)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        _close(y, x64 @ W, dtype)
        _close(dx, dy64 @ W.T, dtype)
        for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
            _close(dw[s], x64[:, i * B:(i + 1) * B].T @ dy64[:, j * B:(j + 1) * B], dtype)
        assert np.all(dw[layout.free_slots()] == -2.0)
        assert np.all(y[:, 5 * B:6 * B] == 0)
        assert np.all(dx[:, 3 * B:4 * B] == 0)
        # deterministic: no atomics, so a second run is bit-identical
        y2, dx2, dw2 = self._device_run(layout, x, dy, w)
        assert np.array_equal(y, y2) and np.array_equal(dx, dx2)
        assert np.array_equal(dw[layout.entry_slots], dw2[layout.entry_slots])

    def test_torch_tensors(self):
        """torch CUDA tensors through cuda.as_cuda_array, on torch's current stream."""
        B, N = self.B, 256
        nb = self.FEATURES // B
        layout = _gpu_layout(nb, nb, seed=5)
        x, dy, w = _inputs(layout, B, np.float32, N, seed=6)
        dev = torch.device("cuda")
        tx, tw = torch.from_numpy(x).to(dev), torch.from_numpy(w).to(dev)
        ty = torch.full((N, nb * B), float("nan"), device=dev)
        tabs = layout._tables_on(dev)
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
        mm.forward(cuda.as_cuda_array(tx), cuda.as_cuda_array(tw),
                   cuda.as_cuda_array(tabs["col_ptr"]), cuda.as_cuda_array(tabs["col_rows"]),
                   cuda.as_cuda_array(tabs["col_slots"]), B, cuda.as_cuda_array(ty), stream=stream)
        torch.cuda.synchronize()
        _close(ty.cpu().numpy(), x.astype(np.float64) @ _dense(layout, w, B), np.float32)
