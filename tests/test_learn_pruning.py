"""GradualPruning: the cubic schedule is followed per layer or globally, the blocks of
smallest norm go, their weights, gradients, optimizer state and gates are reset, a run
resumes exactly from a checkpoint, and the arguments are checked."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
from learn import GradualPruning, L0BlockSparseLinear, cubic_density
from numbasparse import BlockLayout, BlockSparseConv2d, BlockSparseLinear

B = 8


class Net(nn.Module):
    """A conv layer, a plain and a gated linear layer: 4x4, 4x4 and 4x2 block positions."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        full = BlockLayout(np.ones((4, 4), dtype=bool))
        self.conv = BlockSparseConv2d(4 * B, 4 * B, 3, full, block_size=B, padding=1)
        self.fc = BlockSparseLinear(4 * B, 4 * B, full, block_size=B)
        self.head = L0BlockSparseLinear(4 * B, 2 * B, block_size=B, seed=seed)

    def forward(self, x):
        x = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(F.relu(self.fc(x)))


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 4 * B, 3, 3, generator=g), torch.randint(0, 2 * B, (4,), generator=g)


def _train(model, opt, pruning, steps):
    reports = []
    for _ in range(steps):
        x, y = _batch(pruning.steps)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report = pruning.step()
        if report is not None:
            reports.append(report)
    return reports


TOTALS = {"conv": 16, "fc": 16, "head": 8}


def test_cubic_schedule():
    assert cubic_density(0, 1.0, 0.1, 10, 110) == 1.0
    assert cubic_density(10, 1.0, 0.1, 10, 110) == 1.0
    assert cubic_density(60, 1.0, 0.1, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
    assert cubic_density(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    assert cubic_density(500, 1.0, 0.1, 10, 110) == pytest.approx(0.1)


def test_each_layer_follows_the_schedule_at_the_pruning_steps():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruning = GradualPruning(model, opt, final_density=0.25, start_step=2, end_step=23, every=5)
    reports = _train(model, opt, pruning, 30)
    assert [r.step for r in reports] == [2, 7, 12, 17, 22, 23]
    for r in reports:
        d = pruning.scheduled_density(r.step)
        assert r.scheduled == pytest.approx(d)
        for layer in r.layers:
            assert layer.nnz == max(1, math.ceil(d * TOTALS[layer.name] - 1e-9))
    assert pruning.density() == pytest.approx((4 + 4 + 2) / 40)
    assert [layer.layout.nnz for _, layer in pruning.layers()] == [4, 4, 2]


def test_the_blocks_of_smallest_norm_go_and_everything_about_them_is_reset():
    model = Net(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruning = GradualPruning(model, opt, final_density=0.5, start_step=3, end_step=4, every=1)
    _train(model, opt, pruning, 2)
    x, y = _batch(2)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    expected = {}
    for name, layer in pruning.layers():
        norms = layer.weight.detach().reshape(layer.weight.shape[0], -1).double().norm(dim=1).numpy()
        live = norms[layer.layout.entry_slots]
        goal = math.ceil(pruning.scheduled_density(3) * TOTALS[name] - 1e-9)
        order = np.lexsort((-np.arange(live.size), live))
        gone = order[:layer.layout.nnz - goal]
        expected[name] = (set(zip(layer.layout.entry_rows[gone].tolist(), layer.layout.entry_cols[gone].tolist())),
                          layer.layout.entry_slots[gone].copy())
    report = pruning.step()
    assert report is not None and report.removed == sum(len(v[0]) for v in expected.values())
    for name, layer in pruning.layers():
        gone_positions, freed = expected[name]
        mask = layer.layout.mask
        assert all(not mask[i, j] for i, j in gone_positions)
        assert int(mask.sum()) == math.ceil(pruning.scheduled_density(3) * TOTALS[name] - 1e-9)
        index = torch.as_tensor(freed)
        assert torch.all(layer.weight.detach()[index] == 0)
        assert torch.all(layer.weight.grad[index] == 0)
        state = opt.state[layer.weight]
        assert torch.all(state["exp_avg"][index] == 0) and torch.all(state["exp_avg_sq"][index] == 0)
        if name == "head":
            assert torch.all(layer.gate.log_alpha.detach()[index] == learn.DEAD_LOG_ALPHA)
            assert torch.all(opt.state[layer.gate.log_alpha]["exp_avg"][index] == 0)


def test_pruned_model_computes_the_masked_dense_function():
    model = Net(2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruning = GradualPruning(model, opt, final_density=0.3, start_step=1, end_step=1)
    pruning.step()
    x = torch.randn(3, 4 * B, dtype=torch.float64)
    dense = model.fc.to_dense()                       # zeros where blocks were pruned
    assert torch.allclose(model.fc(x), x @ dense + model.fc.bias, atol=1e-12)
    assert (dense.reshape(4, B, 4, B).abs().sum(dim=(1, 3)) > 0).numpy().tolist() == model.fc.layout.mask.tolist()


def test_global_scope_ranks_blocks_across_layers_by_rms():
    model = Net(3)
    with torch.no_grad():
        model.conv.weight.mul_(10.0)                  # conv blocks are all larger: fc and head lose first
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruning = GradualPruning(model, opt, final_density=0.5, start_step=1, end_step=1, scope="global")
    report = pruning.step()
    assert sum(layer.nnz for layer in report.layers) == 20
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["conv"].nnz == 16                  # untouched
    assert by_name["head"].nnz >= 1 and by_name["fc"].nnz >= 1
    assert by_name["fc"].nnz + by_name["head"].nnz == 4


def test_every_layer_keeps_a_block_and_sparser_layers_lose_nothing():
    model = Net(4)
    sparse = BlockLayout(np.eye(4, dtype=bool), capacity=16)
    model.fc.set_layout(sparse)                      # already at 0.25
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruning = GradualPruning(model, opt, final_density=0.01, start_step=1, end_step=10, every=1)
    first = _train(model, opt, pruning, 1)[0]
    assert {layer.name: layer.removed for layer in first.layers}["fc"] == 0
    _train(model, opt, pruning, 9)
    assert [layer.layout.nnz for _, layer in pruning.layers()] == [1, 1, 1]


def _checkpoint(model, opt, pruning):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruning": pruning.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(scope):
    def build():
        model = Net(5)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, opt, GradualPruning(model, opt, 0.2, start_step=3, end_step=18, every=3, scope=scope)

    model, opt, pruning = build()
    _train(model, opt, pruning, 24)

    model2, opt2, pruning2 = build()
    _train(model2, opt2, pruning2, 10)
    state = _checkpoint(model2, opt2, pruning2)
    model3, opt3, pruning3 = build()                 # standard order: build, then load both
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    pruning3.load_state_dict(state["pruning"])
    _train(model3, opt3, pruning3, 14)

    assert pruning3.steps == pruning.steps and pruning3.updates == pruning.updates
    assert [r.as_dict() for r in pruning3.history] == [r.as_dict() for r in pruning.history]
    for (_, a), (_, b) in zip(pruning.layers(), pruning3.layers()):
        assert a.layout == b.layout
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)


def test_compaction_keeps_training():
    model = Net(6)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruning = GradualPruning(model, opt, 0.25, start_step=1, end_step=2, every=1)
    _train(model, opt, pruning, 2)
    x = torch.randn(2, 4 * B, 3, 3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    pruning.compact()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)
    assert [layer.weight.shape[0] for _, layer in pruning.layers()] == [4, 4, 2]
    model.train()
    _train(model, opt, pruning, 2)                   # the optimizer steps on the compacted storage


def test_a_list_of_optimizers():
    model = Net(7)
    convs = list(model.conv.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("conv.")]
    opt_a, opt_b = torch.optim.Adam(convs, lr=0.01), torch.optim.SGD(rest, lr=0.01, momentum=0.9)
    pruning = GradualPruning(model, [opt_a, opt_b], 0.5, start_step=2, end_step=2)
    for _ in range(2):
        x, y = _batch(pruning.steps)
        opt_a.zero_grad(); opt_b.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt_a.step(); opt_b.step()
        pruning.step()
    freed = np.setdiff1d(np.arange(16), model.fc.layout.entry_slots)
    assert torch.all(opt_b.state[model.fc.weight]["momentum_buffer"][torch.as_tensor(freed)] == 0)
    freed = np.setdiff1d(np.arange(16), model.conv.layout.entry_slots)
    assert torch.all(opt_a.state[model.conv.weight]["exp_avg"][torch.as_tensor(freed)] == 0)


def test_diverged_weights_stop_a_pruning_step_naming_the_layer():
    model = Net(8)
    pruning = GradualPruning(model, None, 0.5, start_step=1, end_step=1)
    with torch.no_grad():
        model.fc.weight[0, 0, 0] = float("nan")
    layouts = [layer.layout for _, layer in pruning.layers()]
    with pytest.raises(ValueError, match="layer 'fc'.*training diverged"):
        pruning.step()
    assert [layer.layout for _, layer in pruning.layers()] == layouts and pruning.steps == 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"final_density": 0.0}, ValueError, "final_density must be in"),
    ({"final_density": "0.1"}, TypeError, "final_density must be a number"),
    ({"initial_density": 0.05}, ValueError, "initial_density .* must be >= final_density"),
    ({"start_step": -1}, ValueError, "start_step must be >= 0"),
    ({"end_step": 4}, ValueError, "end_step must be >= 5"),
    ({"every": 0}, ValueError, "every must be >= 1"),
    ({"every": 1.5}, TypeError, "every must be an int"),
    ({"scope": "model"}, ValueError, "scope must be one of"),
    ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
])
def test_arguments_are_checked(kwargs, error, match):
    args = {"model": Net(), "optimizer": None, "final_density": 0.1, "start_step": 5, "end_step": 50}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        GradualPruning(**args)


def test_a_model_without_block_sparse_layers_is_refused():
    with pytest.raises(ValueError, match="no block-sparse layers.*numbasparse.sparsify"):
        GradualPruning(nn.Linear(4, 4), None, 0.1, 0, 10)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GradualPruning("model", None, 0.1, 0, 10)


def test_a_checkpoint_of_another_schedule_is_refused():
    pruning = GradualPruning(Net(), None, 0.1, 0, 10)
    state = GradualPruning(Net(), None, 0.2, 0, 10).state_dict()
    with pytest.raises(ValueError, match="final_density=0.2"):
        pruning.load_state_dict(state)
    assert pruning.steps == 0
