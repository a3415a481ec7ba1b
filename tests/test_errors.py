"""Bad inputs give a clear ValueError / TypeError naming the problem, never a numba
traceback."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from numbasparse import BlockLayout, BlockSparseLinear, BlocksparseMatMul, block_sparse_matmul, layouts
from numbasparse import backend

from helpers import assert_clean_error, raises, randn

B = 8
MASK = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)  # 2 x 3 blocks, nnz 4
NNZ = 4


def _x(n=3, features=2 * B, dtype=torch.float32):
    return randn((n, features), dtype, 1)


def _w(capacity=NNZ, bs=B, dtype=torch.float32):
    return randn((capacity, bs, bs), dtype, 2)


# ------------------------------------------------------------------ block_sparse_matmul
def test_feature_size_not_matching_layout():
    raises(ValueError, r"x has 24 features but the layout has 2 input blocks of size 8 \(16 features\)",
           block_sparse_matmul, _x(features=24), _w(), MASK)


def test_feature_size_not_matching_layout_via_bsmm_feature_axis0():
    bsmm = BlocksparseMatMul(MASK, block_size=B, feature_axis=0)
    # (N, C) given where (C, N) is expected
    raises(ValueError, r"x has 3 features", bsmm, _x(n=3), _w())


def test_weight_wrong_number_of_blocks():
    raises(ValueError, r"w must have shape \(nnz, B, B\) = \(4, 8, 8\).*got \(5, 8, 8\)",
           block_sparse_matmul, _x(), _w(capacity=5), MASK)


def test_weight_wrong_capacity_for_layout_with_free_slots():
    layout = BlockLayout(MASK, slots=[5, 0, 1, 2], capacity=6)
    raises(ValueError, r"capacity 6", block_sparse_matmul, _x(), _w(capacity=NNZ), layout)


def test_weight_blocks_not_square():
    raises(ValueError, r"w must have shape .*got \(4, 16, 8\)",
           block_sparse_matmul, _x(), randn((NNZ, 16, 8), torch.float32, 3), MASK)


def test_weight_block_size_mismatch_explicit():
    raises(ValueError, r"w must have shape \(nnz, B, B\) = \(4, 8, 8\).*got \(4, 16, 16\)",
           block_sparse_matmul, _x(), _w(bs=16), MASK, 8)


def test_weight_not_3d():
    raises(ValueError, r"w must have shape .*got \(4, 64\)",
           block_sparse_matmul, _x(), randn((NNZ, 64), torch.float32, 3), MASK, B)


@pytest.mark.parametrize("bs", [12, 64, 4, 0])
def test_unsupported_block_size_from_weight(bs):
    x = _x(features=2 * bs) if bs else _x()
    raises(ValueError, rf"block_size must be one of \(8, 16, 32\), got {bs}",
           block_sparse_matmul, x, randn((NNZ, bs, bs), torch.float32, 3), MASK)


@pytest.mark.parametrize("bs", [12, 64, True, "8", 8.0])
def test_unsupported_block_size_argument(bs):
    raises(ValueError, r"block_size must be one of \(8, 16, 32\)",
           block_sparse_matmul, _x(), _w(), MASK, bs)


@pytest.mark.parametrize("bs", [12, 64, True])
def test_unsupported_block_size_modules(bs):
    raises(ValueError, r"block_size must be one of \(8, 16, 32\)", BlocksparseMatMul, MASK, block_size=bs)
    raises(ValueError, r"block_size must be one of \(8, 16, 32\)", BlockSparseLinear,
           2 * 8, 3 * 8, MASK, block_size=bs)


@pytest.mark.parametrize("bs", [np.int64(8), 8.0])
def test_block_size_accepted_by_constructor_works_in_call(bs):
    """BlocksparseMatMul must not accept a block_size at construction that its own call
    then rejects: reject it up front or use it."""
    try:
        bsmm = BlocksparseMatMul(MASK, block_size=bs)
    except ValueError as e:
        assert "block_size" in str(e)
        return
    y = bsmm(_x(), _w())
    assert y.shape == (3, 3 * B)


@pytest.mark.parametrize("which", ["x", "w"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.float8_e4m3fn])
def test_unsupported_dtype(which, dtype):
    x, w = _x(), _w()
    if which == "x":
        x = x.to(dtype)
    else:
        w = w.to(dtype)
    raises(TypeError, rf"{which} has dtype {dtype}; supported dtypes are float32, float64, float16 and bfloat16",
           block_sparse_matmul, x, w, MASK)


def test_x_and_w_different_dtypes():
    raises(TypeError, r"x has dtype torch.float32 but w has dtype torch.float64",
           block_sparse_matmul, _x(), _w(dtype=torch.float64), MASK)


def test_module_dtype_mismatch():
    m = BlockSparseLinear(16, 24, MASK, block_size=B)
    raises(TypeError, r"x has dtype torch.float64 but w has dtype torch.float32", m, _x(dtype=torch.float64))


def test_x_and_w_different_devices():
    w = torch.empty((NNZ, B, B), device="meta")
    raises(ValueError, r"x is on cpu but w is on meta", block_sparse_matmul, _x(), w, MASK)


def test_meta_tensors_give_shapes_only():
    """On the meta device the operators' shape functions run (shape inference,
    deferred initialization): no kernel, no error."""
    x = torch.empty((3, 2 * B), device="meta", requires_grad=True)
    w = torch.empty((NNZ, B, B), device="meta", requires_grad=True)
    y = block_sparse_matmul(x, w, MASK)
    assert y.device.type == "meta" and y.shape == (3, 3 * B)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_unsupported_device():
    raises(ValueError, r"unsupported device meta", backend._kernels, "matmul", torch.device("meta"))


def test_cuda_tensors_without_usable_numba_cuda(monkeypatch):
    monkeypatch.setattr(backend, "cuda_usable", lambda: False)
    raises(ValueError, r"numba\.cuda cannot use a GPU", backend._kernels, "matmul", torch.device("cuda"))


def test_cuda_usable_false_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    assert backend.cuda_usable() is False


def test_x_not_a_tensor():
    raises(TypeError, r"x must be a torch.Tensor, got ndarray",
           block_sparse_matmul, _x().numpy(), _w(), MASK)
    raises(TypeError, r"w must be a torch.Tensor, got list",
           block_sparse_matmul, _x(), _w().tolist(), MASK)


def test_sparse_x():
    raises(TypeError, r"x must be a dense \(strided\) tensor",
           block_sparse_matmul, _x().to_sparse(), _w(), MASK)


def test_zero_dim_x():
    raises(ValueError, r"x must have at least one dimension", block_sparse_matmul,
           torch.tensor(1.0), _w(), MASK)


def test_bsmm_x_not_2d():
    bsmm = BlocksparseMatMul(MASK, block_size=B)
    raises(ValueError, r"x must be 2-D", bsmm, randn((2, 3, 2 * B), torch.float32, 1), _w())


def test_bsmm_bad_feature_axis():
    raises(ValueError, r"feature_axis must be 0 or 1, got 2", BlocksparseMatMul, MASK, feature_axis=2)


# ------------------------------------------------------------------ layouts / masks
@pytest.mark.parametrize("mask", [np.ones(4), np.ones((2, 2, 2)), 1, [[[1]]]],
                         ids=["1d", "3d", "scalar", "nested3d"])
def test_layout_not_2d(mask):
    raises(ValueError, r"layout must be a 2-D block mask", BlockLayout, mask)


def test_layout_not_2d_through_matmul():
    raises(ValueError, r"layout must be a 2-D block mask", block_sparse_matmul, _x(), _w(), np.ones(6))


@pytest.mark.parametrize("mask", [
    [[0, 2], [1, 0]],
    [[0.5, 1.0], [1.0, 0.0]],
    [[-1, 0], [1, 1]],
    np.array([[np.nan, 1.0], [0.0, 1.0]]),
], ids=["two", "half", "minus-one", "nan"])
def test_layout_values_not_boolean(mask):
    raises(ValueError, r"layout must be boolean-like: entries must be 0 or 1", BlockLayout, mask)


@pytest.mark.parametrize("mask", [[["a", "b"], ["c", "d"]], [["1", "0"], ["0", "1"]],
                                  np.array([[1, None], [0, 1]], dtype=object), [[1j, 0], [0, 1]]],
                         ids=["letters", "digit-strings", "object", "complex"])
def test_layout_dtype_not_boolean(mask):
    raises(ValueError, r"layout must be boolean-like \(bool or 0/1 numbers\), got dtype", BlockLayout, mask)


def test_layout_bad_mask_through_modules():
    raises(ValueError, r"boolean-like", BlocksparseMatMul, [[0, 2], [1, 0]])
    raises(ValueError, r"boolean-like", BlockSparseLinear, 16, 16, [[0, 2], [1, 0]], block_size=8)


@pytest.mark.parametrize("slots, capacity, match", [
    ([0, 1, 2], None, r"slots must have one entry per live block \(4\)"),
    ([0, 1, 1, 2], None, r"slots must be distinct"),
    ([0, 1, -1, 2], None, r"slots must be non-negative integers"),
    ([0.0, 1.0, 2.0, 3.0], None, r"slots must be non-negative integers"),
    ([0, 1, 2, 3], 3, r"capacity 3 is too small for slot 3"),
])
def test_layout_bad_slots(slots, capacity, match):
    raises(ValueError, match, BlockLayout, MASK, slots=slots, capacity=capacity)


def test_layout_negative_capacity():
    raises(ValueError, r"capacity must be >= 0, got -1", BlockLayout, np.zeros((2, 2)), capacity=-1)


# ------------------------------------------------------------------ generators
NAN, INF = math.nan, math.inf

GENERATOR_CASES = [
    # (generator, valid kwargs, argument, bad values)
    (layouts.random, dict(in_blocks=4, out_blocks=5, density=0.5, seed=1), "in_blocks", [-1, 0, NAN, INF, 2.5]),
    (layouts.random, dict(in_blocks=4, out_blocks=5, density=0.5, seed=1), "out_blocks", [-3, 0, NAN, -INF]),
    (layouts.random, dict(in_blocks=4, out_blocks=5, density=0.5, seed=1), "density", [-0.1, 1.5, NAN, INF, "0.5"]),
    (layouts.random, dict(in_blocks=4, out_blocks=5, density=0.5, seed=1), "seed", [-1, NAN, INF, 1.5]),
    (layouts.dense, dict(in_blocks=4, out_blocks=5), "in_blocks", [-1, 0, NAN, INF]),
    (layouts.dense, dict(in_blocks=4, out_blocks=5), "out_blocks", [-1, 0, NAN, INF]),
    (layouts.block_diagonal, dict(in_blocks=4, out_blocks=6, groups=2), "in_blocks", [-2, NAN, INF]),
    (layouts.block_diagonal, dict(in_blocks=4, out_blocks=6, groups=2), "out_blocks", [-2, NAN, INF]),
    (layouts.block_diagonal, dict(in_blocks=4, out_blocks=6, groups=2), "groups", [-1, 0, NAN, INF, 5]),
    (layouts.watts_strogatz, dict(n=10, k=4, p=0.2, seed=1), "n", [-1, 0, NAN, INF]),
    (layouts.watts_strogatz, dict(n=10, k=4, p=0.2, seed=1), "k", [-1, NAN, INF, 10, 11]),
    (layouts.watts_strogatz, dict(n=10, k=4, p=0.2, seed=1), "p", [-0.5, 1.5, NAN, INF]),
    (layouts.watts_strogatz, dict(n=10, k=4, p=0.2, seed=1), "seed", [-1, NAN, INF]),
    (layouts.barabasi_albert, dict(n=10, m=2, seed=1), "n", [-1, 0, NAN, INF]),
    (layouts.barabasi_albert, dict(n=10, m=2, seed=1), "m", [-1, 0, NAN, INF, 10]),
    (layouts.barabasi_albert, dict(n=10, m=2, seed=1), "seed", [-1, NAN, INF]),
    (layouts.from_dense, dict(weight=np.ones((16, 24)), block_size=8, density=0.5), "density",
     [-0.5, 1.5, NAN, INF]),
    (layouts.from_dense, dict(weight=np.ones((16, 24)), block_size=8, threshold=0.5), "threshold",
     [-0.5, NAN, INF]),
    (layouts.from_dense, dict(weight=np.ones((16, 24)), block_size=8), "block_size", [-8, 0, NAN, INF]),
]


@pytest.mark.parametrize(
    "gen, kwargs, arg, bad",
    [(g, kw, a, b) for g, kw, a, bads in GENERATOR_CASES for b in bads],
    ids=[f"{g.__name__}-{a}={b!r}" for g, kw, a, bads in GENERATOR_CASES for b in bads])
def test_generator_bad_argument(gen, kwargs, arg, bad):
    gen(**kwargs)  # the valid call works
    raises(ValueError, rf"^{arg} must be", gen, **{**kwargs, arg: bad})


def test_from_dense_bad_weight():
    raises(ValueError, r"not divisible by block_size 8", layouts.from_dense, np.ones((16, 20)), 8)
    raises(ValueError, r"weight must be 2-D", layouts.from_dense, np.ones(16), 8)
    raises(ValueError, r"density or threshold, not both", layouts.from_dense, np.ones((16, 16)), 8,
           density=0.5, threshold=1.0)


# ------------------------------------------------------------------ modules
def test_linear_in_features_mismatch():
    raises(ValueError, r"in_features=40 does not match the layout: 2 input blocks of size 8 = 16",
           BlockSparseLinear, 40, 24, MASK, block_size=8)


def test_linear_out_features_mismatch():
    raises(ValueError, r"out_features=16 does not match the layout: 3 output blocks of size 8 = 24",
           BlockSparseLinear, 16, 16, MASK, block_size=8)


def test_linear_input_feature_mismatch_at_call():
    m = BlockSparseLinear(16, 24, MASK, block_size=8)
    raises(ValueError, r"x has 24 features", m, _x(features=24))


def test_linear_set_layout_mismatch():
    m = BlockSparseLinear(16, 24, MASK, block_size=8)
    raises(ValueError, r"layout shape \(3, 2\) != \(2, 3\)", m.set_layout, MASK.T)
    raises(ValueError, r"layout capacity 5 != weight storage 4", m.set_layout,
           BlockLayout(MASK, slots=[4, 0, 1, 2]))


def test_linear_from_dense_not_linear():
    raises(TypeError, r"from_dense expects an nn.Linear, got Conv1d", BlockSparseLinear.from_dense,
           nn.Conv1d(16, 16, 1), block_size=8)


def test_linear_from_dense_bad_block_size():
    raises(ValueError, r"block_size must be one of", BlockSparseLinear.from_dense, nn.Linear(48, 48),
           block_size=12)


def test_load_state_dict_block_size_mismatch():
    src = BlockSparseLinear(32, 32, layouts.dense(2, 2), block_size=16)
    dst = BlockSparseLinear(32, 32, layouts.dense(4, 4), block_size=8)
    with pytest.raises((ValueError, RuntimeError), match=r"block_size|size mismatch") as excinfo:
        dst.load_state_dict(src.state_dict())
    assert_clean_error(excinfo)


def test_simulate_cuda_without_simulator(monkeypatch):
    from numba import config

    monkeypatch.setattr(config, "ENABLE_CUDASIM", 0)
    with pytest.raises(RuntimeError, match="NUMBA_ENABLE_CUDASIM"):
        with backend.simulate_cuda():
            pass
