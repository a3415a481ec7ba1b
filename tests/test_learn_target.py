"""DynamicSparsity with a target density: the removal schedule reaches the target with one
optimizer at a common learning rate and the penalty at its default strength, holds it,
never goes below it, resumes exactly, and validates its arguments."""
import copy
import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
from learn import DynamicSparsity, L0BlockSparseLinear

TOTAL = 32 + 16  # block positions of make_model()


def make_model(seed, dtype=torch.float32):
    """32 -> 64 -> 16 MLP of gated layers with B = 8 (32 and 16 block positions)."""
    torch.manual_seed(seed)
    return nn.Sequential(L0BlockSparseLinear(32, 64, block_size=8, seed=seed, dtype=dtype), nn.ReLU(),
                         L0BlockSparseLinear(64, 16, block_size=8, seed=seed + 1, dtype=dtype))


def make_data(seed, n=256):
    """A small learnable classification task: 16 classes given by a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    y = (x @ torch.randn(32, 16, generator=gen)).argmax(1)
    return x, y


def train(model, opt, ctrl, x, y, steps, target, batch=32):
    """``steps`` training steps of ``loss + l0_penalty(model, target_density=target)``;
    returns the controller's reports."""
    reports = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(y)
        loss = F.cross_entropy(model(x[idx]), y[idx]) + learn.l0_penalty(model, target_density=target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report = ctrl.step()
        if report is not None:
            reports.append(report)
    return reports


def eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        out = F.cross_entropy(model(x), y).item()
    model.train()
    return out


# ------------------------------------------------------------------ schedule
def test_schedule_is_cubic_from_the_start_density_to_the_target_then_holds():
    model = make_model(0)
    ctrl = DynamicSparsity(model, None, every=10, target_density=0.25, ramp=100, start=20)
    assert ctrl.ramp == 100 and ctrl.total_blocks() == TOTAL
    for step in (0, 10, 20):
        assert ctrl.scheduled_density(step) == 1.0
    for step in (30, 45, 70, 100):
        assert ctrl.scheduled_density(step) == pytest.approx(0.25 + 0.75 * (1 - (step - 20) / 100) ** 3)
    for step in (120, 121, 5000):
        assert ctrl.scheduled_density(step) == 0.25
        assert ctrl.scheduled_nnz(step) == 12
    steps = np.arange(0, 200)
    d = np.array([ctrl.scheduled_density(int(s)) for s in steps])
    assert np.all(np.diff(d) <= 0)
    # live-block counts round up: never below the target
    assert all(ctrl.scheduled_nnz(int(s)) == math.ceil(ctrl.scheduled_density(int(s)) * TOTAL - 1e-9)
               for s in steps)


def test_default_ramp_reaches_the_target_by_step_1000_at_the_default_every():
    model = make_model(0)
    ctrl = DynamicSparsity(model, None, target_density=0.2)
    assert ctrl.every == 100 and ctrl.ramp == learn.dynamic.DEFAULT_RAMP == 1000
    assert ctrl.scheduled_density(900) < 0.2 + 0.05 * 0.2 and ctrl.scheduled_density(1000) == 0.2
    assert DynamicSparsity(model, None).scheduled_density(1000) is None  # no target, no schedule
    assert DynamicSparsity(model, None, target_density=0.2, ramp=0).scheduled_density(1) == 0.2


def test_start_density_below_the_target_schedules_no_removal():
    model = make_model(0)
    layer = model[0]
    rows, cols = np.nonzero(np.arange(32).reshape(4, 8) % 4 != 0)  # keep 8 of 32 blocks
    layer.set_layout(layer.layout.remove(rows, cols))
    ctrl = DynamicSparsity(model, None, every=1, target_density=0.6, ramp=5)
    assert ctrl.scheduled_density(3) == pytest.approx(24 / TOTAL)
    for _ in range(6):
        model(torch.randn(4, 32)).sum().backward()
        ctrl.step()
    assert ctrl.density() == pytest.approx(24 / TOTAL)


# ------------------------------------------------------------- training runs
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_one_optimizer_at_a_common_lr_reaches_the_target_and_holds_it(kind):
    """The issue's setting: one optimizer over all parameters at a common learning rate,
    the penalty at default strength, no per-group tuning."""
    target = 0.2
    x, y = make_data(1)
    model = make_model(2)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3) if kind == "adam" else torch.optim.SGD(params, lr=0.1)
    ctrl = DynamicSparsity(model, opt, every=10, target_density=target, ramp=200)
    before = eval_loss(model, x, y)
    reports = train(model, opt, ctrl, x, y, 300, target)
    floor = math.ceil(target * TOTAL)
    assert [r.step for r in reports] == list(range(10, 301, 10))
    for r in reports:  # follows the schedule, never below the target
        assert sum(l.nnz for l in r.layers) == max(floor, ctrl.scheduled_nnz(r.step))
        assert r.scheduled == pytest.approx(ctrl.scheduled_density(r.step))
    held = [r for r in reports if r.step >= 200]
    assert held and all(r.density == floor / TOTAL for r in held)
    assert ctrl.density() <= target + 0.05
    assert all(layer.layout.nnz >= 1 for _, layer in ctrl.layers())
    assert eval_loss(model, x, y) < before  # the sparse model still learned


def test_default_settings_reach_the_target_within_1000_steps():
    target = 0.3
    x, y = make_data(3)
    model = make_model(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = DynamicSparsity(model, opt, target_density=target)
    reports = train(model, opt, ctrl, x, y, 1000, target, batch=8)
    assert [r.step for r in reports] == list(range(100, 1001, 100))
    assert reports[-1].density == math.ceil(target * TOTAL) / TOTAL
    assert all(a.density >= b.density for a, b in zip(reports, reports[1:]))


def test_closed_gates_go_first_and_removal_stops_at_the_target():
    model = make_model(5)
    with torch.no_grad():  # close every gate of layer 0 with distinct keep probabilities
        model[0].gate.log_alpha.copy_(-4.0 - torch.rand(32))
    p_before = model[0].gate.prob_nonzero().detach().clone()
    ctrl = DynamicSparsity(model, None, every=1, target_density=0.5, ramp=1000)
    model(torch.randn(4, 32)).sum().backward()
    report = ctrl.step()  # the schedule asks for ~all blocks, the threshold for 16 fewer
    assert report.removed == TOTAL - 24 and ctrl.density() == 0.5
    kept = model[0].layout.slots
    removed = np.setdiff1d(np.arange(32), kept)
    assert p_before[removed].max() < p_before[kept].min()


def test_scheduled_removal_takes_the_lowest_keep_probability_times_relative_block_norm():
    model = make_model(6)
    rng = np.random.default_rng(6)
    with torch.no_grad():
        for _, layer in learn.gated_layers(model):
            n = layer.gate.n
            layer.gate.log_alpha.copy_(torch.as_tensor(rng.uniform(-1.0, 3.0, n), dtype=torch.float32))
            layer.weight.mul_(torch.as_tensor(rng.uniform(0.1, 2.0, (n, 1, 1)), dtype=torch.float32))
    scores = []
    for li, (_, layer) in enumerate(learn.gated_layers(model)):
        p = layer.gate.prob_nonzero().detach().double()
        norms = layer.weight.detach().double().flatten(1).norm(dim=1)
        live = torch.as_tensor(layer.layout.entry_slots.astype(np.int64))
        mean = norms[live].mean()
        scores += [(float(p[s] * norms[s] / mean), li, int(s)) for s in layer.layout.entry_slots]
    ctrl = DynamicSparsity(model, None, every=1, target_density=0.25, ramp=0)
    ctrl.step()
    assert ctrl.density() == 0.25
    kept = {(li, int(s)) for li, (_, layer) in enumerate(learn.gated_layers(model)) for s in layer.layout.slots}
    ranked = sorted(scores, reverse=True)
    assert {(li, s) for _, li, s in ranked[:12]} == kept


def test_every_layer_keeps_a_block_at_a_tiny_target():
    model = make_model(7)
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # layer 2's blocks all score below layer 0's
    ctrl = DynamicSparsity(model, None, every=1, target_density=0.01, ramp=0)
    ctrl.step()
    assert [layer.layout.nnz for _, layer in ctrl.layers()] == [1, 1]


def test_regrowth_follows_the_schedule_and_refills_to_the_target():
    x, y = make_data(8)
    model = make_model(8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = DynamicSparsity(model, opt, every=5, target_density=0.5, ramp=20, regrow="random", seed=1)
    reports = train(model, opt, ctrl, x, y, 30, 0.5)
    assert [sum(l.nnz for l in r.layers) for r in reports] == [ctrl.scheduled_nnz(r.step) for r in reports]
    assert ctrl.density() == 0.5

    # RigL-style: a model that starts at the target keeps it; closed blocks are replaced
    model = make_model(9)
    layer = model[0]
    layer.set_layout(layer.layout.remove([0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = DynamicSparsity(model, opt, every=5, target_density=40 / TOTAL, regrow="random", seed=1)
    with torch.no_grad():
        layer.gate.log_alpha[layer.layout.slots[:6]] = -5.0
    reports = train(model, opt, ctrl, x, y, 10, 40 / TOTAL)
    assert reports[0].removed == 6 and reports[0].regrown == 6
    assert all(sum(l.nnz for l in r.layers) == 40 for r in reports)


# ------------------------------------------------------------------ resume
def build(seed):
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctrl = DynamicSparsity(model, opt, every=4, target_density=0.3, ramp=24)
    return model, opt, ctrl


def test_resume_mid_ramp_equals_the_uninterrupted_run():
    x, y = make_data(9)
    model, opt, ctrl = build(10)
    start = copy.deepcopy(model.state_dict())
    train(model, opt, ctrl, x, y, 40, 0.3)
    assert ctrl.density() == math.ceil(0.3 * TOTAL) / TOTAL

    model_a, opt_a, ctrl_a = build(10)
    model_a.load_state_dict(start)
    train(model_a, opt_a, ctrl_a, x, y, 11, 0.3)  # mid-ramp, the next step is an update step
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "ctrl": ctrl_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["ctrl"]["config"]["ramp"] == 24 and saved["ctrl"]["config"]["target_density"] == 0.3

    model_b, opt_b, ctrl_b = build(11)  # other initial values: everything must come from the checkpoint
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    ctrl_b.load_state_dict(saved["ctrl"])
    gen_idx = torch.arange(11 * 32, 40 * 32) % len(y)  # the batches the uninterrupted run saw next
    xs, ys = x[gen_idx], y[gen_idx]
    train(model_b, opt_b, ctrl_b, xs, ys, 29, 0.3)

    assert [r.as_dict() for r in ctrl_b.history] == [r.as_dict() for r in ctrl.history]
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def test_reports_without_a_schedule_load_and_print():
    report = learn.SparsityReport.from_dict({"step": 5, "update": 1, "layers": [
        {"name": "0", "nnz": 3, "total": 4, "removed": 1, "regrown": 0}]})
    assert report.scheduled is None and "scheduled" not in str(report)
    assert learn.SparsityReport.from_dict(report.as_dict()) == report
    report.scheduled = 0.75
    assert "scheduled 0.750" in str(report)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"ramp": 100}, ValueError, "ramp needs target_density"),
    ({"target_density": 0.2, "ramp": -1}, ValueError, "ramp must be >= 0"),
    ({"target_density": 0.2, "ramp": 10.0}, TypeError, "ramp must be an integer"),
    ({"target_density": 0.2, "ramp": True}, TypeError, "ramp must be an integer"),
    ({"target_density": 0.2, "ramp": 100, "start": 10, "stop": 50}, ValueError, "before the end of the ramp"),
    ({"target_density": 0.2, "stop": 999}, ValueError, "before the end of the ramp"),
    ({"target_density": "0.2"}, TypeError, "target_density"),
    ({"target_density": 0.0}, ValueError, "target_density"),
])
def test_schedule_arguments_are_checked(kwargs, error, match):
    model = make_model(0)
    with pytest.raises(error, match=match):
        DynamicSparsity(model, None, **kwargs)
    DynamicSparsity(model, None, target_density=0.2, ramp=100, start=10, stop=110)  # the ramp just fits


# ------------------------------------------------------------ README snippet
def _code_lines(text):
    """Non-empty lines without indentation and trailing comments."""
    lines = (line.split("  #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_readme_learn_snippet_is_the_measured_example_loop():
    """The README's learn snippet is, line for line, the code examples/target_density.py
    measures (its model, optimizer, controller and loop)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    start = readme.index("### Learned sparsity")
    snippet = readme[readme.index("```python\n", start) + 10:]
    snippet = snippet[:snippet.index("```")]
    example = set(_code_lines((root / "examples" / "target_density.py").read_text()))
    lines = _code_lines(snippet)
    assert any("DynamicSparsity(" in line for line in lines)
    missing = [line.replace("model = ", "", 1) for line in lines if line not in example]
    example_text = "\n".join(example)
    assert all(line in example_text for line in missing), missing


def test_target_density_example_runs():
    pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("target_density_example",
                                                  root / "examples" / "target_density.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(["--models", "mlp", "--optimizers", "sgd", "--steps", "200"])
    result = example.run("mlp", "sgd", args, example.load(0))
    assert result["d1000"] == result["final"] < 1.0  # removals began on the schedule
    assert result["scheduled"] == pytest.approx(0.2 + 0.8 * (1 - 200 / 1000) ** 3)
    assert result["final"] >= result["scheduled"] - 1e-9
    assert result["accuracy"] > 50


@pytest.mark.parametrize("what", ["gate", "weight"])
def test_diverged_training_is_reported_naming_the_layer_and_nothing_changes(what):
    model = make_model(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = DynamicSparsity(model, opt, every=1, target_density=0.2, ramp=0)
    with torch.no_grad():
        if what == "gate":
            model[2].gate.log_alpha[3] = float("nan")
        else:
            model[2].weight[1, 0, 0] = float("inf")
    layouts = [model[0].layout, model[2].layout]
    with pytest.raises(ValueError, match=r"layer '2'.*training diverged"):
        ctrl.step()
    assert [model[0].layout, model[2].layout] == layouts
