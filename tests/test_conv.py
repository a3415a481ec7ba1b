"""block_sparse_conv2d / BlockSparseConv2d against torch.nn.functional.conv2d with the
dense masked weight in float64: forward, data and weight gradients, on the CPU kernels,
under the CUDA simulator (tiny sizes) and on a real GPU (marked ``gpu``)."""
from __future__ import annotations

import io

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbasparse
from numbasparse import BlockLayout, BlockSparseConv2d, layouts
from numbasparse.backend import simulate_cuda
from numbasparse.functional import block_sparse_conv2d

from helpers import TOL, dead_slots, mask_with_empty, permuted_layout, randn, rel_err


# ------------------------------------------------------------------ references
def dense_conv_reference(w, mask, slots, B):
    """float64 ``(out, in, kh, kw)`` weight assembled from blocks ``w (capacity, kh, kw, B, B)``
    with the slots the test chose (``slots[e]`` for the e-th live entry of ``mask`` in
    row-major order); differentiable in ``w``."""
    mask = np.asarray(mask, dtype=bool)
    w64 = w.to(torch.float64)
    kh, kw = w.shape[1], w.shape[2]
    zero = w64.new_zeros(B, B, kh, kw)
    slot = {(int(i), int(j)): int(s) for (i, j), s in zip(zip(*np.nonzero(mask)), slots)}
    rows = []
    for j in range(mask.shape[1]):          # output block
        row = []
        for i in range(mask.shape[0]):      # input block
            # w[s, dh, dw, k, c] -> dense[c, k, dh, dw]
            row.append(w64[slot[(i, j)]].permute(3, 2, 0, 1) if (i, j) in slot else zero)
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def check_close(out, ref, dtype, what):
    err = rel_err(out, ref)
    tol = 10 * TOL[dtype]
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} ({dtype})"


def run_case(B, in_blocks, out_blocks, kernel, stride, padding, dilation, n, size, dtype, seed,
             empty_row=None, empty_col=None, density=0.6, extra=2, cuda_sim=False):
    """Forward + both gradients of block_sparse_conv2d against F.conv2d in float64."""
    mask = mask_with_empty(in_blocks, out_blocks, empty_row, empty_col, density=density, seed=seed)
    layout, slots, capacity = permuted_layout(mask, extra=extra, seed=seed + 1)
    kh, kw = kernel
    x = randn((n, in_blocks * B, *size), dtype, seed + 2, requires_grad=True)
    w = randn((capacity, kh, kw, B, B), dtype, seed + 3, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y_ref = F.conv2d(x64, dense_conv_reference(w64, mask, slots, B), stride=stride, padding=padding,
                     dilation=dilation)
    dy = randn(tuple(y_ref.shape), dtype, seed + 4)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x64, w64), dy.double())
    if cuda_sim:
        with simulate_cuda():
            y = block_sparse_conv2d(x, w, layout, B, stride, padding, dilation)
            y.backward(dy)
    else:
        y = block_sparse_conv2d(x, w, layout, B, stride, padding, dilation)
        y.backward(dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    check_close(y, y_ref, dtype, "y")
    check_close(x.grad, dx_ref, dtype, "dx")
    check_close(w.grad, dw_ref, dtype, "dw")
    if empty_col is not None:   # output channels fed by no live block: exactly zero
        assert torch.all(y[:, empty_col * B:(empty_col + 1) * B] == 0)
    if empty_row is not None:   # input channels feeding no live block: exactly zero gradient
        assert torch.all(x.grad[:, empty_row * B:(empty_row + 1) * B] == 0)
    dead = dead_slots(slots, capacity)
    if dead.size:
        assert torch.all(w.grad[torch.as_tensor(dead)] == 0)
    return layout


# ------------------------------------------------------------------ CPU kernels
# Each row covers some of: block sizes {8, 16, 32}, kernel sizes {1, 3, 5} (and a
# non-square one), strides {1, 2}, paddings {0, 1, (1, 2), 'same', 'valid'}, dilation 2,
# batch 1, odd spatial sizes, more than one 64-pixel tile, and both packing paths of the
# CPU kernel (dense-ish layouts share one im2col panel per pixel tile, sparse ones gather
# per block column; density 0.6 gives the first, density 0.05 the second).
CPU_CASES = [
    # B, in_b, out_b, kernel, stride, padding, dilation, n, size, density
    (8, 3, 4, (3, 3), 1, 1, 1, 2, (7, 5), 0.6),
    (8, 3, 4, (5, 5), 2, (1, 2), 2, 1, (13, 11), 0.6),
    (8, 4, 3, (3, 3), 2, "valid", 1, 2, (9, 11), 0.05),
    (16, 3, 3, (1, 1), 1, 0, 1, 1, (7, 5), 0.6),
    (16, 3, 4, (3, 3), 1, "same", 2, 2, (7, 5), 0.05),
    (16, 3, 2, (2, 3), 1, "same", 1, 1, (6, 7), 0.6),
    (32, 2, 3, (3, 3), (2, 1), (2, 1), (1, 2), 1, (9, 8), 0.6),
    (32, 3, 2, (5, 5), 1, 2, 1, 1, (5, 7), 0.05),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"B{c[0]}-k{c[3][0]}x{c[3][1]}-s{c[4]}-p{c[5]}-d{c[6]}")
def test_cpu_forward_backward_vs_dense(case, dtype):
    B, in_b, out_b, kernel, stride, padding, dilation, n, size, density = case
    run_case(B, in_b, out_b, kernel, stride, padding, dilation, n, size, dtype, seed=B + in_b + out_b,
             empty_row=1, empty_col=out_b - 1, density=density)


def test_cpu_many_pixel_tiles_and_images():
    """Several images and 64-pixel tiles with a tail tile (20 x 13 = 260 output pixels)."""
    run_case(8, 2, 3, (3, 3), 1, 1, 1, 3, (20, 13), torch.float32, seed=5, empty_row=0, empty_col=2)


def test_stride_larger_than_kernel():
    """Stride 3 with a 2x2 kernel: some input pixels reach no output (zero gradient)."""
    run_case(8, 2, 2, (2, 2), 3, 0, 1, 1, (8, 7), torch.float64, seed=9)


def test_layout_without_live_blocks():
    B = 8
    layout = BlockLayout(np.zeros((2, 3), dtype=bool), capacity=2)
    x = randn((2, 2 * B, 5, 4), torch.float64, 1, requires_grad=True)
    w = randn((2, 3, 3, B, B), torch.float64, 2, requires_grad=True)
    y = block_sparse_conv2d(x, w, layout, padding=1)
    assert y.shape == (2, 3 * B, 5, 4) and torch.all(y == 0)
    y.backward(torch.ones_like(y))
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_empty_batch():
    B = 8
    layout = layouts.random(2, 2, 0.5, seed=0)
    x = torch.zeros(0, 2 * B, 5, 5, requires_grad=True)
    w = randn((layout.capacity, 3, 3, B, B), torch.float32, 1, requires_grad=True)
    y = block_sparse_conv2d(x, w, layout, padding=1)
    assert y.shape == (0, 2 * B, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_non_contiguous_input_and_plain_mask_layout():
    B = 8
    mask = np.array([[1, 0], [1, 1]], dtype=bool)
    leaf = randn((2, 5, 6, 2 * B), torch.float64, 3, requires_grad=True)
    x = leaf.permute(0, 3, 1, 2)               # NCHW view of channels-last storage
    w = randn((3, 3, 3, B, B), torch.float64, 4, requires_grad=True)
    y = block_sparse_conv2d(x, w, mask, padding=1)
    ref = F.conv2d(x.detach(), dense_conv_reference(w.detach(), mask, np.arange(3), B), padding=1)
    check_close(y, ref, torch.float64, "y")
    y.sum().backward()
    assert leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("needs", ["x", "w"])
def test_single_input_gradient(needs):
    B = 8
    layout = layouts.random(2, 2, 0.75, seed=1)
    x = randn((1, 2 * B, 5, 5), torch.float64, 1, requires_grad=needs == "x")
    w = randn((layout.capacity, 3, 3, B, B), torch.float64, 2, requires_grad=needs == "w")
    block_sparse_conv2d(x, w, layout, padding=1).sum().backward()
    assert (x.grad is not None) == (needs == "x") and (w.grad is not None) == (needs == "w")


def test_gradcheck():
    B = 8
    layout = BlockLayout(np.array([[1, 1]], dtype=bool))
    x = randn((1, B, 5, 4), torch.float64, 1, requires_grad=True)
    w = randn((2, 3, 3, B, B), torch.float64, 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: block_sparse_conv2d(a, b, layout, B, stride=2, padding=(1, 2), dilation=(1, 2)),
        (x, w), fast_mode=True)


def test_deterministic_and_independent_of_thread_count():
    B = 16
    mask = mask_with_empty(3, 3, None, None, density=0.7, seed=4)
    layout = BlockLayout(mask)
    x = randn((2, 3 * B, 11, 9), torch.float32, 1, requires_grad=True)
    w = randn((layout.capacity, 3, 3, B, B), torch.float32, 2, requires_grad=True)
    dy = randn((2, 3 * B, 6, 5), torch.float32, 3)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in [1] + sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numbasparse.set_num_threads(threads)
            x.grad = w.grad = None
            y = block_sparse_conv2d(x, w, layout, stride=2, padding=1)
            y.backward(dy)
            results.append((y.detach().clone(), x.grad.clone(), w.grad.clone()))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ module
def test_module_matches_dense_conv_and_trains():
    B = 8
    layout = BlockLayout(mask_with_empty(2, 3, None, 1, seed=3))
    conv = BlockSparseConv2d(2 * B, 3 * B, 3, layout, block_size=B, stride=2, padding=1, dtype=torch.float64)
    assert conv.weight.shape == (layout.capacity, 3, 3, B, B)
    dense = conv.to_dense()
    assert dense.shape == (3 * B, 2 * B, 3, 3)
    assert torch.all(dense[B:2 * B] == 0)            # empty output block
    x = randn((2, 2 * B, 7, 6), torch.float64, 5)
    y = conv(x)
    check_close(y, F.conv2d(x, dense, conv.bias, stride=2, padding=1), torch.float64, "module")
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    y.square().mean().backward()
    assert conv.bias.grad is not None and conv.weight.grad is not None
    before = conv.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, conv.weight)
    assert "block_size=8" in repr(conv)


def test_module_init_scale():
    layout = layouts.random(8, 8, 0.25, seed=0)
    conv = BlockSparseConv2d(128, 128, 3, layout, block_size=16, padding=1)
    y = conv(torch.randn(4, 128, 8, 8))
    assert 0.2 < y.std().item() < 2.0


def test_from_dense_keeps_largest_blocks():
    B = 8
    torch.manual_seed(0)
    dense = torch.nn.Conv2d(2 * B, 3 * B, 3, stride=1, padding="same", dilation=2)
    with torch.no_grad():
        dense.weight[B:2 * B, :B] *= 100          # output block 1, input block 0 (all taps)
    sparse = BlockSparseConv2d.from_dense(dense, block_size=B, density=1 / 6)
    assert sparse.layout.nnz == 1 and sparse.layout.mask[0, 1]
    assert sparse.padding == "same" and sparse.dilation == (2, 2)
    full = BlockSparseConv2d.from_dense(dense, block_size=B, density=1.0)
    x = randn((1, 2 * B, 6, 5), torch.float32, 1)
    check_close(full(x), dense(x).detach(), torch.float32, "from_dense density 1")
    masked = dense.weight.detach().clone()
    masked[:B] = 0
    masked[2 * B:] = 0
    masked[B:2 * B, B:] = 0
    check_close(sparse.to_dense(), masked, torch.float32, "to_dense")
    with pytest.raises(TypeError, match="nn.Conv2d"):
        BlockSparseConv2d.from_dense(torch.nn.Linear(16, 16), block_size=B)
    with pytest.raises(ValueError, match="groups=1"):
        BlockSparseConv2d.from_dense(torch.nn.Conv2d(16, 16, 3, groups=2), block_size=B)


def test_state_dict_round_trip_compact_and_set_layout():
    B = 8
    mask = mask_with_empty(3, 2, None, None, density=0.5, seed=1)
    layout, _, _ = permuted_layout(mask, extra=2, seed=2)
    conv = BlockSparseConv2d(3 * B, 2 * B, (3, 1), layout, block_size=B, padding=(1, 0))
    x = torch.randn(1, 3 * B, 5, 5)
    y = conv(x)
    buffer = io.BytesIO()
    torch.save(conv.state_dict(), buffer)
    fresh = BlockSparseConv2d(3 * B, 2 * B, (3, 1), layouts.dense(3, 2), block_size=B, padding=(1, 0))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert fresh.layout == layout and torch.equal(fresh(x), y)
    compacted = fresh.compact()
    assert compacted.weight.shape[0] == layout.nnz and torch.allclose(compacted(x), y, atol=1e-6)
    conv.load_state_dict(compacted.state_dict())             # capacity shrinks on load
    assert conv.weight.shape[0] == layout.nnz and torch.allclose(conv(x), y, atol=1e-6)
    removed = conv.layout.remove(conv.layout.entry_rows[:1], conv.layout.entry_cols[:1])
    conv.set_layout(removed)
    assert conv.layout.nnz == layout.nnz - 1
    with pytest.raises(ValueError, match="shape"):
        conv.set_layout(layouts.dense(2, 2))
    with pytest.raises(ValueError, match="capacity"):
        conv.set_layout(BlockLayout(removed.mask, capacity=removed.capacity + 1))


# ------------------------------------------------------------------ bad inputs
def _args(B=8, dtype=torch.float32):
    layout = layouts.random(2, 3, 0.5, seed=0)
    x = randn((1, 2 * B, 6, 6), dtype, 0)
    w = randn((layout.capacity, 3, 3, B, B), dtype, 1)
    return x, w, layout


@pytest.mark.parametrize("kwargs, error, match", [
    ({"stride": 0}, ValueError, "stride must be positive"),
    ({"stride": (1, 2, 1)}, ValueError, "stride must be an int or a pair"),
    ({"stride": 1.5}, TypeError, "stride must be an int or a pair"),
    ({"padding": -1}, ValueError, "padding must be non-negative"),
    ({"padding": "full"}, ValueError, "'same' or 'valid'"),
    ({"padding": "same", "stride": 2}, ValueError, "padding='same' needs stride 1"),
    ({"dilation": 0}, ValueError, "dilation must be positive"),
    ({"dilation": (1,)}, ValueError, "dilation must be an int or a pair"),
    ({"dilation": 4}, ValueError, "too small"),
])
def test_bad_geometry(kwargs, error, match):
    x, w, layout = _args()
    with pytest.raises(error, match=match):
        block_sparse_conv2d(x, w, layout, **kwargs)


def test_bad_tensors():
    x, w, layout = _args()
    with pytest.raises(ValueError, match="x must be 4-D"):
        block_sparse_conv2d(x[0], w, layout)
    with pytest.raises(ValueError, match="w must be 5-D"):
        block_sparse_conv2d(x, w[:, 0], layout)
    with pytest.raises(ValueError, match="x has 8 channels but the layout has 2 input blocks"):
        block_sparse_conv2d(x[:, :8], w, layout)
    with pytest.raises(ValueError, match=r"w must have shape \(capacity, kh, kw, B, B\)"):
        block_sparse_conv2d(x, w[:-1], layout)
    with pytest.raises(ValueError, match="block_size must be one of"):
        block_sparse_conv2d(x, w, layout, block_size=12)
    with pytest.raises(ValueError, match="block_size must be one of"):
        block_sparse_conv2d(torch.randn(1, 8, 5, 5), torch.randn(layout.capacity, 3, 3, 4, 4), layout)
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_conv2d(x.double(), w, layout)
    with pytest.raises(TypeError, match="supported dtypes"):
        block_sparse_conv2d(x.int(), w.int(), layout)
    with pytest.raises(TypeError, match="torch.Tensor"):
        block_sparse_conv2d(x.numpy(), w, layout)
    with pytest.raises(ValueError, match="move both to one device"):
        block_sparse_conv2d(x, w.to("meta"), layout)


def test_bad_module_arguments():
    layout = layouts.random(2, 3, 0.5, seed=0)
    with pytest.raises(ValueError, match="in_channels=24 does not match"):
        BlockSparseConv2d(24, 24, 3, layout, block_size=8)
    with pytest.raises(ValueError, match="out_channels=16 does not match"):
        BlockSparseConv2d(16, 16, 3, layout, block_size=8)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockSparseConv2d(16, 24, 3, layout, block_size=12)
    with pytest.raises(ValueError, match="kernel_size must be positive"):
        BlockSparseConv2d(16, 24, 0, layout, block_size=8)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        BlockSparseConv2d(16, 24, 3, layout, block_size=8, stride=2, padding="same")


# ---------------------------------------------------- CUDA kernels under the simulator
# The simulator runs one Python thread per CUDA thread: tiny shapes only.
simulator = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="real GPU present: the simulator is off (see the gpu tests)")


@simulator
def test_simulated_cuda_forward_backward():
    """Both input blocks feed output block 0 (accumulation over live blocks); block
    column 1 is empty."""
    run_case(8, 2, 2, (3, 3), 1, 1, 1, 2, (5, 5), torch.float32, seed=40, empty_col=1, cuda_sim=True)


@simulator
def test_simulated_cuda_stride_dilation_padding():
    run_case(8, 2, 2, (3, 3), 2, (1, 2), 2, 1, (7, 5), torch.float64, seed=41, empty_row=1, cuda_sim=True)


@simulator
def test_simulated_cuda_block16_pointwise():
    run_case(16, 1, 2, (1, 1), 1, "valid", 1, 1, (3, 3), torch.float32, seed=42, cuda_sim=True)


# ------------------------------------------------------------------ real GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B", [16, 32])
@pytest.mark.parametrize("geometry", [(1, 1, 1), (2, 1, 1), (1, "same", 2)], ids=str)
def test_gpu_forward_backward(B, geometry):
    stride, padding, dilation = geometry
    channels, n, size = 128, 4, (17, 16)
    blocks = channels // B
    mask = mask_with_empty(blocks, blocks, 1, 2, density=0.3, seed=B)
    layout, slots, capacity = permuted_layout(mask, extra=3, seed=B + 1)
    x = randn((n, channels, *size), torch.float32, 1).cuda().requires_grad_(True)
    w = randn((capacity, 3, 3, B, B), torch.float32, 2).cuda().requires_grad_(True)
    y = block_sparse_conv2d(x, w, layout, B, stride, padding, dilation)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = F.conv2d(x64, dense_conv_reference(w64, mask, slots, B), stride=stride, padding=padding,
                   dilation=dilation)
    dx_ref, dw_ref = torch.autograd.grad(ref, (x64, w64), dy.double())
    check_close(y, ref, torch.float32, "y (gpu)")
    check_close(x.grad, dx_ref, torch.float32, "dx (gpu)")
    check_close(w.grad, dw_ref, torch.float32, "dw (gpu)")
    assert torch.all(y[:, 2 * B:3 * B] == 0) and torch.all(x.grad[:, B:2 * B] == 0)


@pytest.mark.gpu
@gpu
def test_gpu_module_on_side_stream():
    layout = layouts.random(8, 8, 0.25, seed=0)
    conv = BlockSparseConv2d(128, 128, 3, layout, block_size=16, padding=1).cuda()
    x = torch.randn(8, 128, 32, 32, device="cuda")
    ref = F.conv2d(x, conv.to_dense(), conv.bias, padding=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = conv(x)
    torch.cuda.current_stream().wait_stream(stream)
    check_close(y, ref, torch.float32, "module (gpu)")


@pytest.mark.parametrize("gated", [False, True])
def test_unbatched_image_as_with_nn_conv2d(gated):
    import learn
    torch.manual_seed(0)
    mask = np.ones((2, 2), dtype=bool)
    mask[0, 1] = False
    layer = (learn.L0BlockSparseConv2d(16, 16, 3, mask, block_size=8, padding=1).eval() if gated
             else BlockSparseConv2d(16, 16, 3, mask, block_size=8, padding=1)).double()
    x = torch.randn(16, 5, 6, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (16, 5, 6)
    assert torch.allclose(y, layer(x.unsqueeze(0))[0], rtol=0, atol=1e-12)
    for bad in (torch.randn(16, 5, dtype=torch.float64), torch.randn(1, 1, 16, 5, 6, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\) or 3-D \(C, H, W\), got shape"):
            layer(bad)
