"""numbasparse.sparsify: dense models converted in place, checked against the dense
model (whole, or with the pruned blocks zeroed) in float64 on fresh random inputs; the
report of skipped layers; include / exclude; dtype, device, training flags; checkpoints;
argument errors."""
from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import numbasparse
from numbasparse import BlockSparseConv2d, BlockSparseLinear, SparsifyReport, layouts, sparsify

from helpers import TOL, randn, rel_err

B = 8
LINEARS = ["blocks.0", "blocks.1", "heads.a", "heads.b.1"]
CONVS = ["features.0", "features.2"]


class Net(nn.Module):
    """Convs in a Sequential, linears in a ModuleList and a ModuleDict (one inside a
    Sequential); input ``(N, 8, 7, 7)``, output ``(N, 32)``."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(8, 16, 3, stride=2, padding=1, dtype=dtype), nn.ReLU(),
                nn.Conv2d(16, 16, (3, 2), padding="same", dilation=(1, 2), bias=False, dtype=dtype))
            self.blocks = nn.ModuleList([nn.Linear(16, 32, dtype=dtype), nn.Linear(32, 16, bias=False, dtype=dtype)])
            self.heads = nn.ModuleDict({"a": nn.Linear(16, 8, dtype=dtype),
                                        "b": nn.Sequential(nn.Tanh(), nn.Linear(16, 24, dtype=dtype))})

    def forward(self, x):
        h = self.features(x).mean(dim=(2, 3))
        for layer in self.blocks:
            h = torch.relu(layer(h))
        return torch.cat([self.heads["a"](h), self.heads["b"](h)], dim=-1)


def net_input(seed, dtype=torch.float64, n=3):
    return randn((n, 8, 7, 7), dtype, seed)


def check_close(out, ref, dtype, what):
    err = rel_err(out, ref)
    tol = 10 * TOL[dtype]
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


def block_norms(dense_weight, kind):
    """Independent float64 ``(in_blocks, out_blocks)`` block norms of an ``nn.Linear`` /
    ``nn.Conv2d`` weight (for a conv: over the block and all its taps)."""
    w = dense_weight.detach().double()
    squares = w.pow(2) if kind == "linear" else w.pow(2).sum(dim=(2, 3))      # (out, in)
    out_size, in_size = squares.shape
    return squares.t().reshape(in_size // B, B, out_size // B, B).sum(dim=(1, 3)).sqrt().numpy()


def block_mask_to_weight(mask, weight):
    """The 0/1 ``(in_blocks, out_blocks)`` block mask expanded to ``weight``'s shape."""
    full = torch.from_numpy(np.asarray(mask)).t().repeat_interleave(B, 0).repeat_interleave(B, 1).to(weight.dtype)
    return full if weight.dim() == 2 else full[:, :, None, None]


# ------------------------------------------------------------------ the same function
@pytest.mark.parametrize("kwargs", [{"density": 1.0}, {}, {"threshold": 0.0}])
def test_full_density_preserves_the_function(kwargs):
    dense = Net()
    model = copy.deepcopy(dense)
    out, report = sparsify(model, block_size=B, return_report=True, **kwargs)
    assert out is model
    for name in LINEARS:
        assert type(model.get_submodule(name)) is BlockSparseLinear, name
    for name in CONVS:
        assert type(model.get_submodule(name)) is BlockSparseConv2d, name
    assert [row.name for row in report.rows] == CONVS + LINEARS  # named_modules() order
    assert all(row.converted and row.density == 1.0 for row in report.rows)
    assert report.skipped == []
    for seed in (1, 2):
        x = net_input(seed)
        check_close(model(x), dense(x), torch.float64, f"density 1, input {seed}")


def test_quarter_density_keeps_the_top_norm_blocks():
    dense = Net()
    model = sparsify(copy.deepcopy(dense), density=0.25, block_size=B)
    masked = copy.deepcopy(dense)
    for name in CONVS + LINEARS:
        kind = "conv2d" if name in CONVS else "linear"
        original, converted = dense.get_submodule(name), model.get_submodule(name)
        norms = block_norms(original.weight, kind)
        keep = max(1, round(0.25 * norms.size))
        expect = np.zeros(norms.size, dtype=bool)
        expect[np.argsort(-norms.ravel())[:keep]] = True
        expect = expect.reshape(norms.shape)
        assert np.unique(norms).size == norms.size  # no ties: the top set is unique
        np.testing.assert_array_equal(converted.layout.mask, expect, err_msg=name)
        if kind == "linear":
            assert converted.layout == layouts.from_dense(original.weight.detach().t(), B, density=0.25)
        with torch.no_grad():
            masked.get_submodule(name).weight.mul_(block_mask_to_weight(expect, original.weight))
        dense_weight = masked.get_submodule(name).weight.detach()
        assert torch.equal(converted.to_dense(), dense_weight.t() if kind == "linear" else dense_weight), name
    for seed in (3, 4):
        x = net_input(seed)
        check_close(model(x), masked(x), torch.float64, f"density 0.25, input {seed}")


def test_threshold_keeps_the_blocks_at_or_above_it():
    dense = Net()
    norms = {name: block_norms(dense.get_submodule(name).weight, "conv2d" if name in CONVS else "linear")
             for name in CONVS + LINEARS}
    threshold = float(np.median(np.concatenate([n.ravel() for n in norms.values()])))
    model, report = sparsify(copy.deepcopy(dense), threshold=threshold, block_size=B, return_report=True)
    for name, n in norms.items():
        np.testing.assert_array_equal(model.get_submodule(name).layout.mask, n >= threshold, err_msg=name)
    row = {row.name: row for row in report.rows}
    assert row["blocks.0"].blocks == (int((norms["blocks.0"] >= threshold).sum()), 8)


# ------------------------------------------------------------------ skipped layers
class MyLinear(nn.Linear):
    pass


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = nn.Linear(8, 16, dtype=torch.float64)
        self.odd = nn.Linear(8, 12, dtype=torch.float64)
        self.odd_conv = nn.Conv2d(12, 8, 1, dtype=torch.float64)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2, dtype=torch.float64)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
        self.attn = nn.MultiheadAttention(16, 2, dtype=torch.float64)
        self.sub = MyLinear(8, 8, dtype=torch.float64)
        self.embed = nn.Embedding(16, 8, dtype=torch.float64)
        self.tied = nn.Linear(8, 16, bias=False, dtype=torch.float64)
        self.tied.weight = self.embed.weight
        self.pruned = nn.Linear(8, 8, dtype=torch.float64)
        prune.l1_unstructured(self.pruned, "weight", amount=0.5)
        self.complex = nn.Linear(8, 8, dtype=torch.complex64)
        self.already = BlockSparseLinear(8, 8, layouts.dense(1), block_size=B, dtype=torch.float64)


def test_unconvertible_layers_are_left_and_reported():
    model = Mixed()
    before = dict(model.named_modules())
    out, report = sparsify(model, density=0.5, block_size=B, return_report=True)
    assert out is model and isinstance(report, SparsifyReport) and report.block_size == B
    assert type(model.ok) is BlockSparseLinear
    reasons = {row.name: row.reason for row in report.skipped}
    assert reasons == {
        "odd": "out_features=12 is not a multiple of block_size 8",
        "odd_conv": "in_channels=12 is not a multiple of block_size 8",
        "grouped": "groups=2 (only groups=1 is block-sparse)",
        "reflect": "padding_mode='reflect' (only 'zeros' is block-sparse)",
        "attn.out_proj": ("NonDynamicallyQuantizableLinear, a subclass of nn.Linear (its owner may read the "
                          "weight directly, as nn.MultiheadAttention does)"),
        "sub": ("MyLinear, a subclass of nn.Linear (its owner may read the weight directly, "
                "as nn.MultiheadAttention does)"),
        "tied": "its weight is shared with embed.weight (tied weights)",
        "pruned": ("it has forward pre-hooks the block-sparse layer would not keep "
                   "(weight_norm, spectral_norm and torch.nn.utils.prune work through them)"),
        "complex": "dtype torch.complex64: block-sparse layers hold float32, float64, float16 or bfloat16",
    }
    assert [row.name for row in report.converted] == ["ok"]
    for name in reasons:
        assert model.get_submodule(name) is before[name], name
    assert model.already is before["already"]          # already block-sparse: untouched, not reported
    assert model.tied.weight is model.embed.weight
    q = randn((5, 2, 16), torch.float64, 1)
    y, _ = model.attn(q, q, q)                         # MHA still works with its dense out_proj
    assert y.shape == (5, 2, 16)
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "kind", "in", "->", "out", "blocks", "density", "note"]
    assert re.search(r"^ok +linear +8 -> 16 +1/2 +0\.500 *$", text, re.M)
    assert re.search(r"^grouped +conv2d +8 -> 8, 3x3 +- +- +skipped: groups=2", text, re.M)
    assert text.splitlines()[-1] == "converted 1 of 10 layers (block_size 8), 1/2 blocks kept (0.500)"


def test_meta_weights_are_skipped():
    model = nn.Sequential(nn.Linear(8, 8, device="meta"))
    out, report = sparsify(model, block_size=B, return_report=True)
    assert type(out[0]) is nn.Linear
    assert report.rows[0].reason == "its weight is on the meta device (no values to rank the blocks by)"


# ------------------------------------------------------------------ include / exclude
SELECTIONS = [
    ({"include": nn.Conv2d}, CONVS),
    ({"exclude": nn.Linear}, CONVS),
    ({"include": (nn.Linear,)}, LINEARS),
    ({"include": [nn.Conv2d, "heads.a"]}, CONVS + ["heads.a"]),
    ({"include": "blocks.*"}, ["blocks.0", "blocks.1"]),
    ({"include": ["heads.*", "features.0"]}, ["features.0", "heads.a", "heads.b.1"]),
    ({"exclude": "*.1"}, CONVS + ["blocks.0", "heads.a"]),
    ({"exclude": ["features.*", "heads.?"]}, ["blocks.0", "blocks.1", "heads.b.1"]),
    ({"include": lambda name, m: isinstance(m, nn.Linear) and m.out_features >= 16},
     ["blocks.0", "blocks.1", "heads.b.1"]),
    ({"exclude": lambda name, m: name.startswith("heads")}, CONVS + ["blocks.0", "blocks.1"]),
    ({"include": nn.Linear, "exclude": "heads.*"}, ["blocks.0", "blocks.1"]),
    ({"include": []}, []),
]


@pytest.mark.parametrize("kwargs, converted", SELECTIONS)
def test_include_and_exclude(kwargs, converted):
    dense = Net()
    model, report = sparsify(copy.deepcopy(dense), density=1.0, block_size=B, return_report=True, **kwargs)
    for name in CONVS + LINEARS:
        module = model.get_submodule(name)
        assert isinstance(module, (BlockSparseLinear, BlockSparseConv2d)) == (name in converted), name
    assert sorted(row.name for row in report.converted) == sorted(converted)
    for row in report.skipped:  # include is checked first
        excluded = "exclude" in kwargs and ("include" not in kwargs or row.name.startswith("heads"))
        assert row.reason == ("matched by exclude" if excluded else "not matched by include"), row.name
    x = net_input(5)
    check_close(model(x), dense(x), torch.float64, f"density 1 with {kwargs}")


def test_a_layer_reached_by_two_paths():
    shared = nn.Linear(8, 8, dtype=torch.float64)
    model = nn.Module()
    model.a, model.b = shared, shared
    model, report = sparsify(model, density=1.0, block_size=B, return_report=True)
    assert type(model.a) is BlockSparseLinear and model.b is model.a
    assert [row.name for row in report.rows] == ["a"]
    model2 = nn.Module()
    model2.a, model2.b = shared, shared
    sparsify(model2, block_size=B, exclude="b")          # excluded by any of its names
    assert model2.a is shared and model2.b is shared


# ------------------------------------------------------------------ the root module
def test_root_linear_returns_the_new_module():
    dense = nn.Linear(16, 24, dtype=torch.float64)
    new = sparsify(dense, density=1.0, block_size=B)
    assert type(new) is BlockSparseLinear and type(dense) is nn.Linear
    x = randn((4, 16), torch.float64, 6)
    check_close(new(x), dense(x), torch.float64, "root linear")
    assert sparsify(dense, block_size=B, exclude=nn.Linear) is dense


def test_root_conv_with_report():
    dense = nn.Conv2d(16, 8, 3, padding=1, dtype=torch.float64)
    new, report = sparsify(dense, density=0.5, block_size=B, return_report=True)
    assert type(new) is BlockSparseConv2d and new.layout.nnz == 1
    rows = [(row.name, row.kind, row.shape, row.blocks) for row in report.rows]
    assert rows == [("", "conv2d", (16, 8, 3, 3), (1, 2))]
    assert str(report).splitlines()[1].startswith("(root)  conv2d  16 -> 8, 3x3")


# ------------------------------------------------------------------ dtype, device, flags
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_are_kept(dtype):
    dense = Net(dtype)
    model = sparsify(copy.deepcopy(dense), density=1.0, block_size=B)
    for name in CONVS + LINEARS:
        module = model.get_submodule(name)
        assert all(p.dtype == dtype and p.device.type == "cpu" for p in module.parameters()), name
    x = net_input(7, dtype)
    ref = dense.double()(x.double())
    check_close(model(x), ref, dtype, f"{dtype}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_model_stays_on_cuda():
    dense = Net().cuda()
    model = sparsify(copy.deepcopy(dense), density=1.0, block_size=B)
    for name in CONVS + LINEARS:
        module = model.get_submodule(name)
        assert all(t.is_cuda for t in (*module.parameters(), module.kernel_layout)), name
    x = net_input(8).cuda()
    check_close(model(x), dense(x), torch.float64, "cuda")


def test_training_and_requires_grad_flags_are_kept():
    model = Net()
    model.features.eval()
    model.heads["a"].eval()
    model.blocks[0].weight.requires_grad_(False)
    model.heads["b"][1].bias.requires_grad_(False)
    training = {name: model.get_submodule(name).training for name in CONVS + LINEARS}
    sparsify(model, density=0.5, block_size=B)
    assert {name: model.get_submodule(name).training for name in CONVS + LINEARS} == training
    assert training == {"features.0": False, "features.2": False, "blocks.0": True, "blocks.1": True,
                        "heads.a": False, "heads.b.1": True}
    frozen = {"blocks.0.weight", "heads.b.1.bias"}
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == frozen


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("fresh_seed", [0, 1])
def test_state_dict_round_trip(fresh_seed):
    model = sparsify(Net(seed=0), density=0.5, block_size=B)
    with torch.no_grad():  # as if trained: not what a fresh conversion gives
        for p in model.parameters():
            p.add_(randn(tuple(p.shape), torch.float64, 9))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    # the same dense model, or another one (other layouts), converted the same way
    fresh = sparsify(Net(seed=fresh_seed), density=0.5, block_size=B)
    fresh.load_state_dict(state)
    for name in CONVS + LINEARS:
        assert fresh.get_submodule(name).layout == model.get_submodule(name).layout, name
    x = net_input(10)
    assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------ errors
BAD_ARGUMENTS = [
    ({"model": "net"}, TypeError, "model must be an nn.Module, got str"),
    ({"block_size": 12}, ValueError, "block_size must be one of (8, 16, 32), got 12"),
    ({"block_size": 8.0}, ValueError, "block_size must be one of (8, 16, 32), got 8.0"),
    ({"density": 0}, ValueError, "density must be in (0, 1], got 0"),
    ({"density": 1.5}, ValueError, "density must be in (0, 1], got 1.5"),
    ({"density": float("nan")}, ValueError, "density must be in (0, 1], got nan"),
    ({"density": True}, TypeError, "density must be a number in (0, 1] or None, got bool"),
    ({"density": "0.5"}, TypeError, "density must be a number in (0, 1] or None, got str"),
    ({"threshold": -1.0}, ValueError, "threshold must be a finite non-negative number, got -1.0"),
    ({"threshold": float("inf")}, ValueError, "threshold must be a finite non-negative number, got inf"),
    ({"threshold": [1]}, TypeError, "threshold must be a non-negative number or None, got list"),
    ({"density": 0.5, "threshold": 0.1}, ValueError, "give density or threshold, not both"),
    ({"include": 3}, TypeError, "include must be None, an nn.Module subclass, a name pattern string, a tuple "
                                "or list of those, or a callable (name, module) -> bool; got int"),
    ({"exclude": [nn.Linear, 3]}, TypeError, "exclude must be None, an nn.Module subclass, a name pattern "
                                             "string, a tuple or list of those, or a callable (name, module) "
                                             "-> bool; got 3 in it, which is neither an nn.Module subclass "
                                             "nor a string"),
    ({"include": int}, TypeError, "include must be None, an nn.Module subclass, a name pattern string, a tuple "
                                  "or list of those, or a callable (name, module) -> bool; got <class 'int'>"),
    ({"exclude": lambda name, module: None}, TypeError,
     "exclude must return a bool, got NoneType for 'features.0'"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, error, message):
    kwargs = dict(kwargs)
    model = kwargs.pop("model", None) or Net()
    kwargs.setdefault("block_size", B)
    original = copy.deepcopy(model)
    with pytest.raises(error, match=re.escape(message) + "$"):
        sparsify(model, **kwargs)
    if isinstance(model, nn.Module):
        assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


def test_non_finite_weights_convert_nothing():
    model = Net()
    with torch.no_grad():
        model.blocks[1].weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=re.escape(
            "cannot sparsify 'blocks.1': its weight has NaN or infinite entries, so block norms would be "
            "meaningless; no layer was converted") + "$"):
        sparsify(model, density=0.5, block_size=B)
    assert all(type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d) for name in CONVS + LINEARS)
    # excluded, it stays dense and the others convert
    sparsify(model, density=0.5, block_size=B, exclude="blocks.1")
    assert type(model.blocks[1]) is nn.Linear and type(model.blocks[0]) is BlockSparseLinear


def test_exported():
    assert numbasparse.sparsify is sparsify and "sparsify" in numbasparse.__all__
    assert "SparsifyReport" in numbasparse.__all__
