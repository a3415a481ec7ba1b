"""Checkpoints of slot-stored layers: resuming after compaction in the standard PyTorch
order (build model, build optimizer, load both), inconsistent checkpoints rejected with
the module left as it was, state a resumed run needs (the conv layer's FLOPs weighting),
and deferred initialization (meta device, ``to_empty``, ``reset_parameters``)."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
from numbasparse import BlockLayout, BlockSparseConv2d, BlockSparseLinear

B = 8
KINDS = ["linear", "conv", "l0_linear", "l0_conv"]


def _layout(seed):
    """4 x 4 blocks, about half live, in permuted slots of a storage with 3 free slots."""
    rng = np.random.default_rng(seed)
    mask = rng.random((4, 4)) < 0.5
    mask[0, 0] = mask[3, 3] = True
    nnz = int(mask.sum())
    return BlockLayout(mask, rng.permutation(nnz + 3)[:nnz], nnz + 3)


def _layer(kind, seed, layout_seed=0):
    torch.manual_seed(seed)
    layout = _layout(layout_seed)
    if kind == "linear":
        return BlockSparseLinear(4 * B, 4 * B, layout, block_size=B)
    if kind == "conv":
        return BlockSparseConv2d(4 * B, 4 * B, 3, layout, block_size=B, padding=1)
    if kind == "l0_linear":
        return learn.L0BlockSparseLinear(4 * B, 4 * B, layout, block_size=B, seed=seed)
    return learn.L0BlockSparseConv2d(4 * B, 4 * B, 3, layout, block_size=B, padding=1, seed=seed)


class _Net(nn.Module):
    def __init__(self, kind, seed):
        super().__init__()
        self.kind = kind
        self.body = _layer(kind, seed)
        self.head = nn.Linear(4 * B, 3)

    def forward(self, x):
        y = torch.relu(self.body(x))
        if self.kind.endswith("conv"):
            y = y.mean(dim=(2, 3))
        return self.head(y)


def _batches(kind, count, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 4 * B, 5, 5) if kind.endswith("conv") else (6, 4 * B)
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(count)]


def _build(kind, seed):
    """Model, Adam optimizer and (for gated layers) a DynamicSparsity controller."""
    model = _Net(kind, seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ctrl = learn.DynamicSparsity(model, opt, every=2, threshold=0.5) if kind.startswith("l0") else None
    return model, opt, ctrl


def _train(model, opt, ctrl, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        if ctrl is not None:
            loss = loss + 0.01 * learn.l0_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctrl is not None:
            ctrl.step()
    return loss  # still alive, as in a training loop: its graph holds the old parameters


def _compact(model, opt, ctrl):
    if ctrl is not None:
        ctrl.compact()
    else:
        model.body.compact(opt)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_compact_in_the_standard_order(kind):
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    print("seed", seed)   # shown when the test fails
    batches = _batches(kind, 9, seed)
    model, opt, ctrl = _build(kind, seed)
    if ctrl is not None:  # close some gates so that blocks leave the layout before compaction
        with torch.no_grad():
            model.body.gate.log_alpha[model.body.layout.slots[:2]] = -4.0
    loss = _train(model, opt, ctrl, batches[:4])
    capacity = model.body.layout.capacity
    _compact(model, opt, ctrl)
    assert model.body.weight.shape[0] == model.body.layout.nnz < capacity
    _train(model, opt, ctrl, batches[4:5])  # a step after compaction, `loss` of the last one alive
    del loss
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "ctrl": ctrl.state_dict() if ctrl else None}, buffer)
    _train(model, opt, ctrl, batches[5:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt_r, ctrl_r = _build(kind, seed + 1)   # other initial values and full capacity
    weight = resumed.body.weight
    assert weight.shape[0] == capacity
    resumed.load_state_dict(saved["model"])
    opt_r.load_state_dict(saved["opt"])
    if ctrl_r is not None:
        ctrl_r.load_state_dict(saved["ctrl"])
    assert resumed.body.weight is weight, "the Parameter the optimizer holds must stay the layer's"
    loaded = weight.detach().clone()
    _train(resumed, opt_r, ctrl_r, batches[5:])

    assert not torch.equal(resumed.body.weight.detach(), loaded), "training stopped after the load"
    assert resumed.body.layout == model.body.layout
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        if torch.is_tensor(a):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(opt.state_dict()["state"].values(), opt_r.state_dict()["state"].values()):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "l0_linear"])
def test_optimizer_loaded_before_the_model_also_resumes(kind):
    model, opt, ctrl = _build(kind, 3)
    _train(model, opt, ctrl, _batches(kind, 2, 3))
    _compact(model, opt, ctrl)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed, opt_r, _ = _build(kind, 4)
    opt_r.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["model"])
    before = resumed.body.weight.detach().clone()
    _train(resumed, opt_r, None, _batches(kind, 1, 5))
    assert not torch.equal(resumed.body.weight.detach(), before)


@pytest.mark.parametrize("kind", KINDS)
def test_compact_without_the_optimizer_is_refused_at_its_next_step(kind):
    model, opt, ctrl = _build(kind, 6)
    _train(model, opt, None, _batches(kind, 2, 6))
    model.body.compact()                      # the optimizer's Adam moments still have every slot
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = _batches(kind, 1, 7)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"optimizer state 'exp_avg' of a .* has \d+ slots but the parameter has"):
        opt.step()
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), f"{k} changed although the step was refused"


def test_stateless_optimizer_keeps_training_a_compacted_layer():
    model, _, _ = _build("linear", 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.body.compact()
    before = model.body.weight.detach().clone()
    _train(model, opt, None, _batches("linear", 1, 8))
    assert not torch.equal(model.body.weight.detach(), before)


@pytest.mark.parametrize("capacities", [(9, 12), (1, 3)], ids=["more-slots", "broadcastable"])
def test_optimizer_state_for_another_capacity_is_refused(capacities):
    """State of another model (here: SGD momentum of another capacity) must not be used,
    not even where it would broadcast (one slot against three)."""
    def build(capacity):
        mask = np.zeros((4, 4), dtype=bool)
        mask.ravel()[:capacity] = True
        layer = BlockSparseLinear(4 * B, 4 * B, mask, block_size=B)
        return layer, torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)

    small, opt_small = build(capacities[0])
    big, opt_big = build(capacities[1])
    small(torch.randn(2, 4 * B)).sum().backward()
    opt_small.step()
    opt_big.load_state_dict(opt_small.state_dict())
    big(torch.randn(2, 4 * B)).sum().backward()
    with pytest.raises(ValueError, match=rf"has {capacities[0]} slots but the parameter has {capacities[1]}"):
        opt_big.step()


# ------------------------------------------------------------------ inconsistent checkpoints
def _corrupt_capacity(sd, prefix):
    extra = dict(sd[prefix + "_extra_state"])
    extra["capacity"] = int(extra["capacity"]) + 2
    sd[prefix + "_extra_state"] = extra


def _corrupt_gate(sd, prefix):
    sd[prefix + "gate.log_alpha"] = sd[prefix + "gate.log_alpha"][:-1].clone()


def _corrupt_slots(sd, prefix):
    extra = dict(sd[prefix + "_extra_state"])
    slots = extra["slots"].clone()
    slots[1] = slots[0]
    extra["slots"] = slots
    sd[prefix + "_extra_state"] = extra


def _corrupt_bias(sd, prefix):
    sd[prefix + "bias"] = sd[prefix + "bias"][:-1].clone()


def _corrupt_gate_without_layout(sd, prefix):
    del sd[prefix + "_extra_state"]
    _corrupt_gate(sd, prefix)


def _corrupt_noise_key(sd, prefix):
    sd[prefix + "gate.noise_key"] = torch.zeros(3, dtype=torch.int64)


def _drop_weight_of_compacted(sd, prefix):
    del sd[prefix + "weight"]


CORRUPTIONS = {
    "capacity": (_corrupt_capacity, r"weight has shape .* but the checkpoint's layout has capacity"),
    "gate-length": (_corrupt_gate, r"gate.log_alpha has shape .* but the checkpoint's layout has capacity"),
    "bias-shape": (_corrupt_bias, r"body.bias has shape \(31,\) but the module's is \(32,\)"),
    "gate-length-without-layout": (_corrupt_gate_without_layout,
                                   r"has shape .* but the layer's layout has capacity"),
    "noise-key": (_corrupt_noise_key, r"gate.noise_key has shape \(3,\) but the module's is \(2,\)"),
    "duplicate-slots": (_corrupt_slots, r"slots must be distinct"),
    "missing-weight": (_drop_weight_of_compacted, r"layout of capacity \d+ but no body.weight"),
}


# gate and noise corruptions only apply to gated layers (the others have no gates)
_CORRUPTION_CASES = [(corruption, kind) for corruption in CORRUPTIONS for kind in KINDS
                     if kind.startswith("l0") or not corruption.startswith(("gate", "noise"))]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("corruption, kind", _CORRUPTION_CASES)
def test_inconsistent_checkpoint_is_refused_and_the_module_unchanged(corruption, kind, strict):
    corrupt, match = CORRUPTIONS[corruption]
    source, opt, ctrl = _build(kind, 11)
    _train(source, opt, ctrl, _batches(kind, 1, 11))
    source.body.compact()
    sd = copy.deepcopy(source.state_dict())
    corrupt(sd, "body.")
    target, _, _ = _build(kind, 12)
    before = copy.deepcopy(target.body.state_dict())
    layout = target.body.layout
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(sd, strict=strict)
    assert target.body.layout is layout
    after = target.body.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(after[key], value), key
    x, _ = _batches(kind, 1, 13)[0]
    target(x)  # still consistent and usable


# ------------------------------------------------------------------ state a resume needs
def test_conv_flops_weighting_survives_a_checkpoint():
    conv = learn.L0BlockSparseConv2d(4 * B, 4 * B, 3, block_size=B, padding=1, seed=1)
    conv(torch.randn(2, 4 * B, 7, 9))
    flops = conv.block_flops()
    assert flops == B * B * 9 * 7 * 9
    fresh = learn.L0BlockSparseConv2d(4 * B, 4 * B, 3, block_size=B, padding=1, seed=2)
    assert fresh.block_flops() != flops
    fresh.load_state_dict(torch.load(_saved(conv.state_dict()), weights_only=True))
    assert fresh.block_flops() == flops
    torch.testing.assert_close(learn.l0_penalty(fresh, weighting="flops"), learn.l0_penalty(conv, weighting="flops"))


def test_conv_checkpoint_without_flops_weighting_loads():
    conv = learn.L0BlockSparseConv2d(2 * B, 2 * B, 3, block_size=B, seed=1)
    conv(torch.randn(1, 2 * B, 6, 6))
    sd = conv.state_dict()
    extra = dict(sd["_extra_state"])
    del extra["out_positions"]                 # as written before the output size was saved
    sd["_extra_state"] = extra
    fresh = learn.L0BlockSparseConv2d(2 * B, 2 * B, 3, block_size=B, seed=2)
    fresh.load_state_dict(sd)
    assert fresh.block_flops() == B * B * 9


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ------------------------------------------------------------------ deferred initialization
def _deferred(kind, seed):
    with torch.device("meta"):
        layer = _layer(kind, seed)
    assert layer.weight.device.type == "meta"
    layer.to_empty(device="cpu")
    torch.manual_seed(seed)
    for module in layer.modules():  # the large-model loaders' pattern, children included
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return layer


@pytest.mark.parametrize("kind", KINDS)
def test_meta_to_empty_reset_parameters_equals_eager(kind):
    eager = _layer(kind, 21)
    deferred = _deferred(kind, 21)
    a, b = eager.state_dict(), deferred.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
    if kind.startswith("l0"):
        assert torch.equal(a["gate.noise_key"], b["gate.noise_key"]) and b["gate.noise_counter"] == 0
        free = eager.layout.free_slots()
        assert torch.all(deferred.gate.log_alpha[free] == learn.DEAD_LOG_ALPHA)
    x, _ = _batches(kind, 1, 22)[0]
    eager.train(False), deferred.train(False)
    assert torch.equal(eager(x), deferred(x))


def test_gate_reset_parameters_keeps_closed_gates_closed():
    gate = learn.HardConcreteGate(6, seed=0)
    gate.kill_([1, 4])
    with torch.no_grad():
        gate.log_alpha.uniform_(-3, 3)
    gate.reset_parameters()
    expected = torch.full((6,), gate.init_log_alpha)
    expected[[1, 4]] = learn.DEAD_LOG_ALPHA
    assert torch.equal(gate.log_alpha.detach(), expected)
    gate.reset_([4])
    gate.reset_parameters()
    assert gate.log_alpha[4] == gate.init_log_alpha and gate.log_alpha[1] == learn.DEAD_LOG_ALPHA


def test_meta_build_with_default_seed():
    with torch.device("meta"):
        layer = learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B)   # seed drawn on the CPU
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.all(layer.gate.log_alpha == layer.gate.init_log_alpha)


def test_reset_after_compaction_opens_every_live_gate():
    layer = learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B, seed=0)
    rows, cols = layer.layout.entry_rows[:5], layer.layout.entry_cols[:5]
    slots = layer.layout.entry_slots[:5].copy()
    layer.set_layout(layer.layout.remove(rows, cols))
    layer.gate.kill_(slots)
    layer.compact()
    layer.reset_parameters()
    assert layer.gate.n == 11
    assert torch.all(layer.gate.log_alpha == layer.gate.init_log_alpha)


@pytest.mark.parametrize("kind", ["linear", "l0_linear"])
def test_backward_of_a_graph_from_before_compaction_is_refused(kind):
    """The graph saved the weight with its old slots: its backward must raise, not read
    the compacted storage with the old layout."""
    layer = _layer(kind, 5)
    x = torch.randn(3, 4 * B, requires_grad=True)
    loss = layer(x).sum()
    layer.compact()
    with pytest.raises(RuntimeError, match="modified by an inplace operation|built before .* storage was resized"):
        loss.backward()
    layer(x).sum().backward()   # a new graph trains the compacted layer
    assert layer.weight.grad.shape == layer.weight.shape
