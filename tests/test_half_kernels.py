"""float16 and bfloat16 kernels: the CPU matmul programs (direct and packed paths), the
SIMD widen / narrow intrinsics, the CPU conv, the numba.cuda kernels under the simulator
(float16) and the checked numpy kernel API.

Every reference is float64 arithmetic on the *same* 16-bit values the kernels get (the
inputs are rounded to 16 bits first and widened exactly), so the only differences the
tolerances must absorb are the kernels' float32 accumulation and their final rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from numbasparse import BlockLayout, backend
from numbasparse.backend import simulate_cuda
from numbasparse.functional import block_sparse_conv2d, block_sparse_matmul
from numbasparse.kernels.cpu import matmul as cpu_mm

from helpers import (HALF, HALF_IDS, check_rel_16, dead_slots, dense_reference, half_randn, mask_with_empty,
                     permuted_layout)

# the 16-bit patterns inside the kernels (see numbasparse.kernels.cpu.simd)
STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.int16}
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}   # 1 + EPS: the next value above 1
# a term whose 4096-fold sum is representable in both formats, but which no 16-bit running
# total reaches, adding float32 partial sums of 1 to 256 terms (see the probes test)
ODD = {dtype: 1.0 + 11 * eps for dtype, eps in EPS.items()}


def ulps_apart(a, b, dtype):
    """|a - b| in units in the last place of ``dtype`` (both of ``dtype`` and finite): the
    distance of their bit patterns read as sign-magnitude integers (+0 and -0 coincide)."""
    ia = a.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    ib = b.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF

    def ordered(i):   # sign-magnitude -> a monotone integer line
        return torch.where(i >= 0x8000, -(i - 0x8000), i)

    return (ordered(ia) - ordered(ib)).abs()


# ====================================================================== matmul vs float64
ROWS = [1, 5, 17, 300]   # direct (< 16 rows, with batch 1), packed, packed in two chunks


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("B", [8, 16, 32])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_matmul_forward_and_gradients_match_float64(dtype, B, rows, with_bias):
    seed = 100 * B + rows + (7 if with_bias else 0) + (3 if dtype == torch.float16 else 0)
    in_blocks, out_blocks = 3, 4
    mask = mask_with_empty(in_blocks, out_blocks, empty_row=1, empty_col=2, density=0.6, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=3, seed=seed + 1)
    dead = dead_slots(slots, capacity)
    assert dead.size == 3

    x = half_randn((rows, in_blocks * B), dtype, seed + 2, requires_grad=True)
    w_init = half_randn((capacity, B, B), dtype, seed + 3)
    w_init[torch.as_tensor(dead)] = float("nan")        # free slots must never be read
    w = w_init.requires_grad_(True)
    bias = half_randn((out_blocks * B,), dtype, seed + 4, requires_grad=True) if with_bias else None
    dy = half_randn((rows, out_blocks * B), dtype, seed + 5)

    y = block_sparse_matmul(x, w, layout, B, bias=bias)
    y.backward(dy)

    # float64 reference from the same 16-bit values
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = x64 @ dense_reference(w64, mask, slots, B)
    if with_bias:
        y64 = y64 + bias.detach().double()
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())

    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    assert y.shape == (rows, out_blocks * B)
    check_rel_16(y, y64, dtype, "y")
    check_rel_16(x.grad, dx64, dtype, "dx")
    live = torch.as_tensor(slots)
    check_rel_16(w.grad[live], dw64[live], dtype, "dw")
    # free slots of dw exactly zero (their NaN weights not read either)
    assert torch.all(w.grad[torch.as_tensor(dead)] == 0)
    # the empty block column: exactly zero, or exactly the bias
    col = y[:, 2 * B:3 * B].detach()
    expected = torch.zeros_like(col) if bias is None else bias.detach()[2 * B:3 * B].expand_as(col)
    assert torch.equal(col, expected)
    # the empty block row: its data gradient is exactly zero
    assert torch.all(x.grad[:, B:2 * B] == 0)
    if with_bias:
        assert bias.grad.dtype == dtype
        check_rel_16(bias.grad, dy.double().sum(0), dtype, "dbias")


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_backend_entries_match_the_functional_api(dtype, rows):
    """``backend._forward`` / ``_backward`` and the checked ``forward`` / ``backward``
    give bit-identical results to the functional API's autograd."""
    B = 16
    mask = mask_with_empty(2, 3, empty_row=0, empty_col=1, seed=rows)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=rows + 1)
    x = half_randn((rows, 2 * B), dtype, 1, requires_grad=True)
    w = half_randn((capacity, B, B), dtype, 2, requires_grad=True)
    bias = half_randn((3 * B,), dtype, 3)
    dy = half_randn((rows, 3 * B), dtype, 4)
    y = block_sparse_matmul(x, w, layout, B, bias=bias)
    y.backward(dy)
    y_b = backend._forward(x.detach(), w.detach(), layout, B, bias)
    dx_b, dw_b = backend._backward(dy, x.detach(), w.detach(), layout, B, need_dx=True, need_dw=True)
    y_c = backend.forward(x.detach(), w.detach(), layout, B, bias)
    dx_c, dw_c = backend.backward(dy, x.detach(), w.detach(), layout, B)
    for got in (y_b, y_c):
        assert got.dtype == dtype and torch.equal(got, y.detach())
    for dx, dw in ((dx_b, dw_b), (dx_c, dw_c)):
        assert dx.dtype == dtype and dw.dtype == dtype
        assert torch.equal(dx, x.grad) and torch.equal(dw, w.grad)
    only_dx = backend._backward(dy, None, w.detach(), layout, B, need_dx=True, need_dw=False)
    only_dw = backend._backward(dy, x.detach(), None, layout, B, need_dx=False, need_dw=True)
    assert only_dx[1] is None and torch.equal(only_dx[0], x.grad)
    assert only_dw[0] is None and torch.equal(only_dw[1], w.grad)


# ====================================================================== float32 accumulation
@pytest.mark.parametrize("rows", [1, 5, 32, 300])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_long_reductions_accumulate_in_float32(dtype, rows):
    """4096 terms summed into one output: exact in float32, wrong in any 16-bit running
    sum (a bfloat16 sum of ones stalls at 256, a float16 one at 2048).  The sums of
    ``ODD = 1 + 11 * EPS`` also defeat a kernel that sums runs of 2 to 256 terms in
    float32 but rounds the running total to 16 bits between runs (checked in
    :func:`test_the_accumulation_probes_catch_16_bit_running_totals`)."""
    B, n_blocks = 32, 128
    C = B * n_blocks
    layout = BlockLayout(np.ones((n_blocks, 1), dtype=bool))
    for value, exact in ((1.0, 4096.0), (ODD[dtype], 4096.0 * ODD[dtype])):
        assert torch.tensor(exact).to(dtype).item() == exact      # representable in the output
        x = torch.ones(rows, C, dtype=dtype)
        w = torch.full((n_blocks, B, B), value, dtype=dtype)
        y = block_sparse_matmul(x, w, layout, B)
        assert y.dtype == dtype
        assert torch.all(y.double() == exact), (value, y.double().unique())

        # the data gradient: dx = dy @ W^T sums over the 4096 outputs of the transposed layout
        layout_t = BlockLayout(np.ones((1, n_blocks), dtype=bool))
        dy = torch.ones(rows, C, dtype=dtype)
        dx, _ = backend._backward(dy, None, w, layout_t, B, need_dx=True, need_dw=False)
        assert dx.dtype == dtype and torch.all(dx.double() == exact), (value, dx.double().unique())


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_the_accumulation_probes_catch_16_bit_running_totals(dtype):
    """The probes above are sharp: 4096 terms of 1 or ODD, summed in runs of ``run`` terms
    (exact in float32) whose totals are added to a 16-bit running sum, miss the exact sum."""
    for value, exact in ((1.0, 4096.0), (ODD[dtype], 4096.0 * ODD[dtype])):
        term = float(torch.tensor(value).to(dtype))
        assert term == value
        for run in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            if value == 1.0 and run > 1:
                continue            # runs of ones sum exactly in 16 bits: that is what ODD is for
            total = torch.zeros((), dtype=dtype)
            for _ in range(4096 // run):
                total = (total.float() + run * term).to(dtype)
            assert total.item() != exact, (value, run)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_weight_gradient_sums_4096_rows_in_float32(dtype):
    B, N = 32, 4096
    layout = BlockLayout(np.ones((2, 1), dtype=bool))
    x = torch.ones(N, 2 * B, dtype=dtype)
    for value, exact in ((1.0, 4096.0), (ODD[dtype], 4096.0 * ODD[dtype])):
        dy = torch.full((N, B), value, dtype=dtype)
        _, dw = backend._backward(dy, x, None, layout, B, need_dx=False, need_dw=True)
        assert dw.dtype == dtype and torch.all(dw.double() == exact), (value, dw.double().unique())


@pytest.mark.parametrize("rows", [3, 20])
def test_float16_partial_sums_beyond_the_float16_range(rows):
    """40000 + 40000 - 40000: a float16 running sum overflows to inf, float32 gives 40000."""
    B = 8
    layout = BlockLayout(np.ones((1, 1), dtype=bool))
    x = torch.zeros(rows, B, dtype=torch.float16)
    x[:, 0] = 40000.0
    x[:, 1] = 40000.0
    x[:, 2] = -40000.0
    w = torch.ones(1, B, B, dtype=torch.float16)
    y = block_sparse_matmul(x, w, layout, B)
    assert torch.all(y == 40000.0), y


# ====================================================================== rounding on store
def _float32_patterns(n, seed):
    """float32 values from random bit patterns plus the cases rounding gets wrong: ties
    (odd and even), values just either side of a tie, the largest values that round to
    a finite 16-bit value and the smallest that overflow, subnormals, zeros, infinities,
    NaNs."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    tops = rng.integers(0, 2 ** 16, 4096, dtype=np.uint64).astype(np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001, 0x0000, 0x0001, 0xFFFF], dtype=np.uint32)
    bf_cases = (tops[:, None] | low[None, :]).ravel()            # bfloat16 ties and neighbours
    h = rng.integers(0, 2 ** 32, 4096, dtype=np.uint64).astype(np.uint32) & ~np.uint32(0x1FFF)
    low_h = np.array([0x1000, 0x0FFF, 0x1001, 0x0000, 0x0001, 0x1FFF], dtype=np.uint32)
    fp_cases = (h[:, None] | low_h[None, :]).ravel()              # float16 ties (13 dropped bits)
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0, -65520.0,
                       6.1e-5, 6.0e-8, 2.98e-8, 2.99e-8, 1e-40, -1e-42, 3.4e38,
                       np.float32(3.3895314e38), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11,
                       1.0 + 3 * 2 ** -11], dtype=np.float32)
    # NaNs whose payload sits in the low bits only: rounding must not carry them into inf
    nans = np.array([0x7F800001, 0xFF800001, 0x7F807FFF, 0x7F808000, 0x7F800FFF, 0x7FFFFFFF, 0x7FC00000],
                    dtype=np.uint32)
    return np.concatenate([bits.view(np.float32), bf_cases.view(np.float32), fp_cases.view(np.float32),
                           values, nans.view(np.float32)])


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_simd_narrow_and_widen_match_torch_bit_for_bit(dtype):
    import numba

    from numbasparse.kernels.cpu.simd import sload, sstore, vload, vstore

    @numba.njit
    def vector_copy(src, dst):     # vload from src, vstore into dst, 8 lanes at a time
        for i in range(0, src.shape[0], 8):
            vstore(dst, i, vload(src, i, 8))

    @numba.njit
    def scalar_copy(src, dst):
        for i in range(src.shape[0]):
            sstore(dst, i, sload(src, i))

    values = _float32_patterns(1 << 18, seed=5)
    values = values[:values.size // 8 * 8]
    storage = STORAGE[dtype]
    want = torch.from_numpy(values.copy()).to(dtype).view(torch.int16).numpy().view(storage)
    nan = np.isnan(values)
    all_patterns = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(storage).copy()
    widened_want = torch.from_numpy(all_patterns.view(np.int16).copy()).view(dtype).float().numpy()
    for copy_fn in (vector_copy, scalar_copy):
        narrowed = np.empty(values.shape, dtype=storage)
        copy_fn(values, narrowed)
        wrong = np.flatnonzero((narrowed != want) & ~nan)
        assert wrong.size == 0, [(float(values[i]), hex(int(narrowed[i]) & 0xFFFF), hex(int(want[i]) & 0xFFFF))
                                 for i in wrong[:5]]
        back = torch.from_numpy(narrowed.view(np.int16).copy()).view(dtype).float().numpy()
        assert np.all(np.isnan(back[nan])), "NaN must stay NaN"
        # widening: every one of the 65536 patterns, exactly as torch widens it
        widened = np.empty(all_patterns.shape, dtype=np.float32)
        copy_fn(all_patterns, widened)
        assert np.array_equal(widened, widened_want, equal_nan=True)
        assert np.array_equal(np.isnan(widened), np.isnan(widened_want))


@pytest.mark.parametrize("rows", [5, 17])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_single_products_round_like_torch(dtype, rows):
    """One live block holding ``c * I``: ``y = c * x`` in float32, one product per output,
    so the kernel's store must round exactly as ``(x.float() * c).to(dtype)`` does
    (exactly ``x`` itself for c = 1; scaling float16 subnormals by powers of two rounds)."""
    B = 16
    mask = np.zeros((2, 3), dtype=bool)
    mask[1, 0] = True                      # block row 0 and block columns 1, 2 empty
    layout = BlockLayout(mask, slots=np.array([2]), capacity=4)
    base = torch.cat([half_randn((rows, 2 * B), dtype, rows),
                      half_randn((rows, 2 * B), dtype, rows + 1, scale=1e-3),
                      half_randn((rows, 2 * B), dtype, rows + 2, scale=300.0)])
    if dtype == torch.float16:             # include float16 subnormals
        base = torch.cat([base, half_randn((rows, 2 * B), dtype, rows + 3, scale=2e-6)])
    x = base
    eye = torch.eye(B, dtype=torch.float64)
    for c in (1.0, 0.125, 4.0, 3.0, 1.0 + 2 ** -7, 0.7001953125, -1.25):
        w = torch.zeros(4, B, B, dtype=dtype)
        w[2] = (eye * c).to(dtype)
        w[[0, 1, 3]] = float("nan")
        c16 = float(w[2, 0, 0])
        y = block_sparse_matmul(x, w, layout, B)
        want = (x[:, B:].float() * c16).to(dtype)
        if c == 1.0:
            assert torch.equal(want, x[:, B:])      # the identity: y is x itself
        got = y[:, :B]
        # bit for bit, except that a zero product may come out as +0 or -0
        mismatch = (got.view(torch.int16) != want.view(torch.int16)) & ~((got == 0) & (want == 0))
        assert not mismatch.any(), (c, got[mismatch][:5], want[mismatch][:5])
        assert torch.all(y[:, B:] == 0)


@pytest.mark.parametrize("rows", [5, 300])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_rounded_sums_within_one_ulp_of_the_float64_sum(dtype, rows):
    B = 32
    mask = mask_with_empty(4, 3, empty_row=None, empty_col=None, density=0.7, seed=rows)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=rows + 1)
    x = half_randn((rows, 4 * B), dtype, rows + 2)
    w = half_randn((capacity, B, B), dtype, rows + 3)
    y = block_sparse_matmul(x, w, layout, B)
    dense = dense_reference(w, mask, slots, B)
    exact = x.double() @ dense
    want = exact.float().to(dtype)
    # float32 sums of at most 4 * 32 terms are off by at most 128 * 2**-24 * sum|terms|:
    # where that is below a 16-bit ulp of the result (no heavy cancellation), the stored
    # value is at most 1 ulp from the correctly rounded sum; near-cancelling outputs may
    # be further in ulps but not in absolute terms
    magnitude = x.double().abs() @ dense.abs()
    float32_bound = 128 * 2.0 ** -24 * magnitude
    ulp = torch.tensor(2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10, dtype=torch.float64) \
        * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -14))))
    well_conditioned = float32_bound < 0.5 * ulp
    assert well_conditioned.double().mean() > 0.75     # the check below is not vacuous
    ulps = ulps_apart(y, want, dtype)
    assert int(ulps[well_conditioned].max()) <= 1, int(ulps[well_conditioned].max())
    assert torch.all((y.double() - exact).abs() <= ulp + float32_bound)
    equal = (ulps == 0).double().mean().item()
    assert equal > 0.99, f"only {equal:.4f} of the outputs equal the correctly rounded sum"


# ====================================================================== special values
def _blockwise_reference(x, w, layout, B):
    """float64 ``y`` from the live blocks only, elementwise products (IEEE inf / nan
    semantics, no BLAS, dead blocks contribute nothing, not ``inf * 0``)."""
    x64, w64 = x.double(), w.double()
    y = torch.zeros(x.shape[0], layout.out_blocks * B, dtype=torch.float64)
    for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots):
        xi = x64[:, i * B:(i + 1) * B]
        y[:, j * B:(j + 1) * B] += (xi[:, :, None] * w64[s][None]).sum(1)
    return y


@pytest.mark.parametrize("rows", [5, 20])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_inf_and_nan_propagate(dtype, rows):
    B = 8
    mask = mask_with_empty(3, 3, empty_row=None, empty_col=2, seed=rows)
    layout, slots, capacity = permuted_layout(mask, extra=1, seed=rows + 1)
    x = half_randn((rows, 3 * B), dtype, rows + 2)
    w = half_randn((capacity, B, B), dtype, rows + 3)
    w[w == 0] = 0.5
    x[0, 3] = float("inf")
    x[1, B + 2] = float("-inf")
    x[2, 5] = float("nan")
    x[3, 1] = float("inf")
    x[3, 2] = float("-inf")           # inf - inf: nan in every live output of row 3
    y = block_sparse_matmul(x, w, layout, B)
    ref = _blockwise_reference(x, w, layout, B)
    assert y.dtype == dtype
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.isnan(ref[2, :2 * B]).any() and torch.isinf(ref[0]).any() and torch.isinf(ref[1]).any()
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(y), inf)
    assert torch.equal(y[inf].double(), ref[inf])
    finite = torch.isfinite(ref)
    check_rel_16(y[finite], ref[finite], dtype, "finite outputs")
    # the empty block column sees none of it
    assert torch.all(y[:, 2 * B:] == 0)

    # gradients: a nan in dy reaches dx through the live blocks and dw of the blocks it feeds
    dy = half_randn((rows, 3 * B), dtype, rows + 4)
    dy[4, 0] = float("nan")
    x_ok = half_randn((rows, 3 * B), dtype, rows + 5)
    dx, dw = backend._backward(dy, x_ok, w, layout, B)
    assert torch.isnan(dx[4]).any() and not torch.isnan(dx[torch.arange(rows) != 4]).any()
    fed = [s for i, j, s in zip(layout.entry_rows, layout.entry_cols, layout.entry_slots) if j == 0]
    assert all(torch.isnan(dw[s]).any() for s in fed)
    assert not torch.isnan(dw[torch.as_tensor(dead_slots(slots, capacity))]).any()


@pytest.mark.parametrize("rows", [3, 20])
def test_float16_overflow_gives_inf_like_torch(rows):
    B = 8
    layout = BlockLayout(np.ones((1, 1), dtype=bool))
    x = torch.full((rows, B), 300.0, dtype=torch.float16)
    x[:, 1::2] = -300.0
    w = torch.zeros(1, B, B, dtype=torch.float16)
    w[0, 0, 0] = 300.0                 # +-90000: beyond 65504
    w[0, 0, 1] = 200.0                 # 60000: finite
    w[0, 0, 2] = 218.375               # 65512.5 rounds down to 65504 (below the halfway point 65520)
    w[0, 0, 3] = 218.5                 # 65550 rounds up to inf
    w[0, 1, 4] = 300.0                 # -90000 -> -inf
    y = block_sparse_matmul(x, w, layout, B)
    want = (x.float() @ w[0].float()).to(torch.float16)
    assert torch.equal(y, want)
    assert torch.all(y[:, 0] == float("inf")) and torch.all(y[:, 4] == float("-inf"))
    assert torch.all(y[:, 3] == float("inf"))
    assert torch.all(y[:, 1] == 60000.0) and torch.all(y[:, 2] == 65504.0)


# ====================================================================== conv
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_conv_forward_and_backward_match_float64(dtype, batch):
    B = 8
    seed = batch + (10 if dtype == torch.float16 else 0)
    mask = mask_with_empty(3, 3, empty_row=0, empty_col=1, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=seed + 1)
    dead = torch.as_tensor(dead_slots(slots, capacity))
    x = half_randn((batch, 3 * B, 7, 6), dtype, seed + 2, requires_grad=True)
    w = half_randn((capacity, 3, 3, B, B), dtype, seed + 3, scale=0.3)
    w[dead] = 1.0
    w.requires_grad_(True)
    y = block_sparse_conv2d(x, w, layout, B, stride=2, padding=1)
    dy = half_randn(tuple(y.shape), dtype, seed + 4)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = block_sparse_conv2d(x64, w64, layout, B, stride=2, padding=1)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())

    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    assert y.shape == (batch, 3 * B, 4, 3)
    check_rel_16(y, y64, dtype, "y")
    check_rel_16(x.grad, dx64, dtype, "dx")
    live = torch.as_tensor(slots)
    check_rel_16(w.grad[live], dw64[live], dtype, "dw")
    assert torch.all(w.grad[dead] == 0)
    assert torch.all(y[:, B:2 * B] == 0)          # empty output block column
    assert torch.all(x.grad[:, :B] == 0)          # empty input block row


# ====================================================================== CUDA simulator
@pytest.fixture
def tiny():
    B = 8
    mask = np.array([[True, False], [True, True]])     # block column 1 fed by one block
    layout, slots, capacity = permuted_layout(mask, extra=1, seed=3)
    return B, mask, layout, slots, capacity


def test_cuda_simulator_float16_matmul_agrees_with_cpu(tiny):
    B, mask, layout, slots, capacity = tiny
    dtype = torch.float16
    x = half_randn((3, 2 * B), dtype, 1, requires_grad=True)
    w = half_randn((capacity, B, B), dtype, 2, requires_grad=True)
    bias = half_randn((2 * B,), dtype, 3, requires_grad=True)
    dy = half_randn((3, 2 * B), dtype, 4)
    with simulate_cuda():
        y_sim = block_sparse_matmul(x, w, layout, B, bias=bias)
        y_sim.backward(dy)
    grads_sim = [t.grad.clone() for t in (x, w, bias)]
    for t in (x, w, bias):
        t.grad = None
    y_cpu = block_sparse_matmul(x, w, layout, B, bias=bias)
    y_cpu.backward(dy)
    assert y_sim.dtype == dtype and all(g.dtype == dtype for g in grads_sim)
    # two float32 sums in different orders, each rounded once to float16: at most 1 ulp apart
    for got, want in zip([y_sim.detach()] + grads_sim, [y_cpu.detach(), x.grad, w.grad, bias.grad]):
        assert int(ulps_apart(got, want, dtype).max()) <= 1
    y64 = x.detach().double() @ dense_reference(w.detach(), mask, slots, B) + bias.detach().double()
    check_rel_16(y_sim, y64, dtype, "simulated y")
    dead = torch.as_tensor(dead_slots(slots, capacity))
    assert torch.all(grads_sim[1][dead] == 0)

    # the sums accumulate in float32 there too: 40000 + 40000 - 40000
    xs = torch.zeros(2, 2 * B, dtype=dtype)
    xs[:, B], xs[:, B + 1], xs[:, B + 2] = 40000.0, 40000.0, -40000.0
    ws = torch.zeros(capacity, B, B, dtype=dtype)
    ws[torch.as_tensor(slots)] = 1.0
    with simulate_cuda():
        ys = block_sparse_matmul(xs, ws, layout, B)
    assert torch.all(ys == 40000.0), ys


def test_cuda_simulator_float16_conv_agrees_with_cpu():
    B = 8
    mask = np.array([[True, True]])
    layout, slots, capacity = permuted_layout(mask, extra=1, seed=4)
    dtype = torch.float16
    x = half_randn((1, B, 4, 4), dtype, 5)
    w = half_randn((capacity, 3, 3, B, B), dtype, 6, scale=0.3)
    with simulate_cuda():
        y_sim = block_sparse_conv2d(x, w, layout, B, stride=2, padding=1)
    y_cpu = block_sparse_conv2d(x, w, layout, B, stride=2, padding=1)
    assert y_sim.dtype == dtype and y_sim.shape == y_cpu.shape == (1, 2 * B, 2, 2)
    assert int(ulps_apart(y_sim, y_cpu, dtype).max()) <= 1
    y64 = block_sparse_conv2d(x.double(), w.double(), layout, B, stride=2, padding=1)
    check_rel_16(y_sim, y64, dtype, "simulated conv y")


def test_cuda_simulator_rejects_bfloat16_naming_float16(tiny):
    B, mask, layout, slots, capacity = tiny
    x = half_randn((2, 2 * B), torch.bfloat16, 1)
    w = half_randn((capacity, B, B), torch.bfloat16, 2)
    xc = half_randn((1, B, 4, 4), torch.bfloat16, 3)
    wc = half_randn((capacity, 3, 3, B, B), torch.bfloat16, 4)
    with simulate_cuda():
        with pytest.raises(TypeError, match="float16"):
            block_sparse_matmul(x, w, layout, B)
        with pytest.raises(TypeError, match="float16"):
            backend._backward(x, x, w, layout, B)
        with pytest.raises(TypeError, match="float16"):
            block_sparse_conv2d(xc, wc, BlockLayout(np.array([[True, True]]), capacity=capacity), B, padding=1)



# ====================================================================== the numpy kernel API
@pytest.mark.parametrize("rows", [3, 40])
def test_numpy_kernel_api_accepts_float16(rows):
    B = 16
    mask = mask_with_empty(3, 2, empty_row=2, empty_col=None, seed=rows)
    layout, slots, capacity = permuted_layout(mask, extra=2, seed=rows + 1)
    x = half_randn((rows, 3 * B), torch.float16, 1).numpy()
    w = half_randn((capacity, B, B), torch.float16, 2).numpy()
    dy = half_randn((rows, 2 * B), torch.float16, 3).numpy()
    y = np.full((rows, 2 * B), np.nan, dtype=np.float16)
    cpu_mm.forward(x, w, layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
    dx = np.full((rows, 3 * B), np.nan, dtype=np.float16)
    cpu_mm.backward_data(dy, w, layout.row_ptr, layout.row_cols, layout.row_slots, B, dx)
    dw = np.full((capacity, B, B), 7.0, dtype=np.float16)        # dead slots stay untouched
    cpu_mm.backward_weight(x, dy, layout.entry_rows, layout.entry_cols, layout.entry_slots, B, dw)

    W = dense_reference(torch.from_numpy(w), mask, slots, B)
    x64, dy64 = torch.from_numpy(x).double(), torch.from_numpy(dy).double()
    check_rel_16(torch.from_numpy(y), x64 @ W, torch.float16, "numpy y")
    check_rel_16(torch.from_numpy(dx), dy64 @ W.T, torch.float16, "numpy dx")
    w_t = torch.from_numpy(w).double().requires_grad_(True)
    dw64 = torch.autograd.grad(x64 @ dense_reference(w_t, mask, slots, B), w_t, dy64)[0]
    live = torch.as_tensor(slots)
    check_rel_16(torch.from_numpy(dw)[live], dw64[live], torch.float16, "numpy dw")
    assert np.all(dw[dead_slots(slots, capacity)] == 7.0)
    assert np.all(dx[:, 2 * B:] == 0)
    # identical to the torch path
    xt = torch.from_numpy(x)
    assert torch.equal(torch.from_numpy(y), block_sparse_matmul(xt, torch.from_numpy(w), layout, B))
    # numpy float16 mixed with float32 is refused, naming the dtypes
    with pytest.raises(TypeError, match=r"(?s)float16.*float32|float32.*float16"):
        cpu_mm.forward(x, w.astype(np.float32), layout.col_ptr, layout.col_rows, layout.col_slots, B, y)
