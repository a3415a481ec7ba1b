"""DynamicSparsity: removal, regrowth, optimizer-state hygiene, kernel work, resume."""
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
import numbasparse.backend
import numbasparse.functional
from learn import DynamicSparsity, L0BlockSparseLinear
from numbasparse import BlockLayout


def fresh_seed():
    return int(np.random.SeedSequence().generate_state(1)[0])


def make_model(seed, layouts=(None, None), dtype=torch.float64):
    """32 -> 64 -> 16 MLP of gated layers with B = 8 (32 and 16 block positions)."""
    torch.manual_seed(seed)
    return nn.Sequential(L0BlockSparseLinear(32, 64, layouts[0], block_size=8, dtype=dtype), nn.ReLU(),
                         L0BlockSparseLinear(64, 16, layouts[1], block_size=8, dtype=dtype))


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def train_step(model, opt, x, y, lam=0.0):
    loss = F.mse_loss(model(x), y)
    if lam:
        loss = loss + lam * learn.l0_penalty(model)
    opt.zero_grad()
    loss.backward()
    opt.step()


def close_gates(layer, positions):
    """Set the gates of live blocks ``positions`` [(i, j), ...] to keep probability ~5e-4."""
    slots = [layer.layout.slot_of(i, j) for i, j in positions]
    with torch.no_grad():
        layer.gate.log_alpha[slots] = -6.0
    return slots


def per_slot_state(opt, param):
    return {k: v for k, v in opt.state[param].items() if torch.is_tensor(v) and v.shape == param.shape}


# ------------------------------------------------------------------ removal
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_removed_blocks_are_zero_stateless_and_inert(kind, monkeypatch):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    model = make_model(seed)
    opt = make_optimizer(kind, model)
    layer = model[0]
    picks = rng.choice(layer.layout.nnz, size=7, replace=False)
    positions = list(zip(layer.layout.entry_rows[picks], layer.layout.entry_cols[picks]))
    ctrl = DynamicSparsity(model, opt, every=3, threshold=0.3)
    x, y = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
    for _ in range(2):  # the blocks train (and gather optimizer state) while their gates are open
        train_step(model, opt, x, y)
        assert ctrl.step() is None
    slots = close_gates(layer, positions)
    assert all(torch.any(v[slots] != 0) for v in per_slot_state(opt, layer.weight).values())
    nnz_before = layer.layout.nnz
    train_step(model, opt, x, y)
    report = ctrl.step()

    assert report is not None and ctrl.history == [report]
    assert report.layers[0].removed == 7 and report.layers[1].removed == 0 and report.removed == 7
    layout = layer.layout
    assert layout.nnz == nnz_before - 7 and report.layers[0].nnz == layout.nnz
    assert not any(layout.mask[i, j] for i, j in positions)
    # the kernels' tables list live blocks only
    assert layout.col_rows.size == layout.row_cols.size == layout.entry_slots.size == layout.nnz
    assert set(slots) <= set(layout.free_slots().tolist())
    # weights, gates, gradients and optimizer state of the freed slots are cleared
    assert torch.all(layer.weight[slots] == 0)
    assert torch.all(layer.gate.log_alpha[slots] == learn.DEAD_LOG_ALPHA)
    for param in (layer.weight, layer.gate.log_alpha):
        state = per_slot_state(opt, param)
        assert state, "optimizer keeps per-slot state"
        for value in state.values():
            assert torch.all(value[slots] == 0)

    # what is stored in a freed slot does not reach the output, in eval and train mode
    x2 = torch.randn(5, 32, dtype=torch.float64)
    model.eval()
    y_eval = model(x2)
    gen_state = [l.gate.noise_counter.clone() for _, l in learn.gated_layers(model)]
    model.train()
    y_train = model(x2)
    with torch.no_grad():
        layer.weight[slots] = torch.randn(len(slots), 8, 8, dtype=torch.float64) * 100
    model.eval()
    assert torch.equal(model(x2), y_eval)
    model.train()
    for (_, l), s in zip(learn.gated_layers(model), gen_state):
        l.gate.noise_counter.copy_(s)
    assert torch.equal(model(x2), y_train)
    with torch.no_grad():
        layer.weight[slots] = 0

    # the kernels receive only the live blocks
    seen = []
    forward = numbasparse.backend._forward   # what the matmul operator runs

    def spy(*args, **kwargs):
        lay = next(a for a in args if isinstance(a, BlockLayout))
        w = args[1]
        seen.append((lay.nnz, lay.col_rows.size, w.shape[0]))
        return forward(*args, **kwargs)

    monkeypatch.setattr(numbasparse.backend, "_forward", spy)
    model(x2)
    assert seen[0] == (layout.nnz, layout.nnz, layout.nnz)

    # nothing revives them: more training keeps the slots at zero weight and zero state
    for _ in range(5):
        train_step(model, opt, torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64),
                   lam=0.01)
        ctrl.step()
    assert torch.all(layer.weight[slots] == 0)
    for value in per_slot_state(opt, layer.weight).values():
        assert torch.all(value[slots] == 0)


@pytest.fixture
def one_thread():
    """Single-threaded torch and numba: the timing below then measures work, not two
    OpenMP thread pools spinning against each other on a small machine."""
    import numbasparse

    torch_threads, numba_threads = torch.get_num_threads(), __import__("numba").get_num_threads()
    torch.set_num_threads(1)
    numbasparse.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    numbasparse.set_num_threads(numba_threads)


def test_kernel_time_shrinks_with_the_layout(one_thread):
    """The layer's forward+backward gets cheaper as blocks are removed (real work removed)."""
    import time

    torch.manual_seed(fresh_seed())
    layer = L0BlockSparseLinear(512, 512, block_size=32)
    x = torch.randn(256, 512, requires_grad=True)

    def cost():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            layer(x).sum().backward()
            times.append(time.perf_counter() - t0)
        return min(times)

    cost()
    dense = cost()
    keep = np.zeros(layer.layout.shape, dtype=bool)
    keep[np.arange(16), np.arange(16)] = True
    rows, cols = np.nonzero(~keep)
    layer.set_layout(layer.layout.remove(rows, cols))
    assert layer.layout.nnz == 16
    cost()
    assert cost() < 0.5 * dense


def test_target_density_is_a_floor_without_regrowth():
    seed = fresh_seed()
    model = make_model(seed)
    opt = make_optimizer("adam", model)
    total = 32 + 16
    with torch.no_grad():  # close every gate of layer 0, with distinct keep probabilities
        model[0].gate.log_alpha.copy_(-4.0 - torch.rand(32, dtype=torch.float64))
    ctrl = DynamicSparsity(model, opt, every=1, threshold=0.3, target_density=0.5)
    train_step(model, opt, torch.randn(8, 32, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))
    p_before = model[0].gate.prob_nonzero().detach().clone()  # what the update ranks: after the optimizer step
    report = ctrl.step()
    floor = math.ceil(0.5 * total)
    assert sum(r.nnz for r in report.layers) == floor and report.density == pytest.approx(floor / total)
    kept = model[0].layout.slots
    removed = np.setdiff1d(np.arange(32), kept)
    # lowest keep probability went first (ties impossible: distinct values)
    assert p_before[removed].max() < p_before[kept].min()


def test_a_layer_keeps_at_least_one_block():
    model = make_model(fresh_seed())
    opt = make_optimizer("sgd", model)
    with torch.no_grad():
        model[2].gate.log_alpha.fill_(-8.0)
        model[2].gate.log_alpha[5] = -7.0
    ctrl = DynamicSparsity(model, opt, every=1)
    train_step(model, opt, torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64))
    ctrl.step()
    assert model[2].layout.nnz == 1 and model[2].layout.slots.tolist() == [5]


# ------------------------------------------------------------------ regrowth
def test_gradient_regrowth_picks_largest_dense_gradient_into_free_slots():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    mask = rng.random((4, 8)) < 0.5
    mask[0, 0] = True
    nnz = int(mask.sum())
    layout0 = BlockLayout(mask, rng.permutation(32)[:nnz], 32)  # 32 - nnz free slots
    model = make_model(seed, (layout0, None))
    opt = make_optimizer("adam", model)
    layer = model[0]
    free_before = set(layout0.free_slots().tolist())
    total = 32 + 16
    grow = 3
    ctrl = DynamicSparsity(model, opt, every=1, regrow="gradient", target_density=(nnz + 16 + grow) / total)

    captured = {}

    def hook(module, inputs, out):
        captured["x"] = inputs[0].detach()
        out.register_hook(lambda g: captured.update(dy=g.detach()))

    layer.register_forward_hook(hook)
    x, y = torch.randn(12, 32, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    train_step(model, opt, x, y)
    report = ctrl.step()

    grad = captured["x"].t() @ captured["dy"]  # dense dW of the last batch, (32, 64)
    norms = grad.reshape(4, 8, 8, 8).pow(2).sum(dim=(1, 3)).sqrt().numpy()
    dead = np.flatnonzero(~mask.ravel())
    expected = set(dead[np.argsort(-norms.ravel()[dead], kind="stable")[:grow]].tolist())
    new_mask = layer.layout.mask
    added = set(np.flatnonzero(new_mask.ravel() & ~mask.ravel()).tolist())
    assert report.layers[0].regrown == grow and added == expected
    slots = [layer.layout.slot_of(*np.unravel_index(a, (4, 8))) for a in sorted(added)]
    assert set(slots) <= free_before
    assert torch.all(layer.weight[slots] == 0)
    torch.testing.assert_close(layer.gate.prob_nonzero()[slots], torch.full((grow,), 0.9, dtype=torch.float64))
    for param in (layer.weight, layer.gate.log_alpha):
        for value in per_slot_state(opt, param).values():
            assert torch.all(value[slots] == 0)
    # the regrown blocks train from there on (evaluation gates: a sampled gate may be 0)
    model.eval()
    train_step(model, opt, torch.randn(12, 32, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64))
    assert torch.all(layer.weight.grad[slots].flatten(1).abs().sum(1) > 0)


def run_random_regrowth(seed, removal_seed):
    model = make_model(removal_seed)
    opt = make_optimizer("sgd", model)
    rng = np.random.default_rng(removal_seed)
    layer = model[0]
    picks = rng.choice(32, size=6, replace=False)
    positions = list(zip(layer.layout.entry_rows[picks], layer.layout.entry_cols[picks]))
    slots = close_gates(layer, positions)
    ctrl = DynamicSparsity(model, opt, every=2, regrow="random", seed=seed)
    gen = torch.Generator().manual_seed(removal_seed)
    for _ in range(4):
        train_step(model, opt, torch.randn(8, 32, generator=gen, dtype=torch.float64),
                   torch.randn(8, 16, generator=gen, dtype=torch.float64))
        ctrl.step()
    return model, opt, ctrl, positions, slots


def test_random_regrowth_refills_freed_slots_with_zero_weight_and_state():
    removal_seed = fresh_seed()
    model, opt, ctrl, positions, slots = run_random_regrowth(7, removal_seed)
    first, second = ctrl.history
    layer = model[0]
    # update 1 removes the closed blocks (they cannot come back in the same update),
    # update 2 refills the layer to its starting density at random
    assert (first.layers[0].removed, first.layers[0].regrown) == (6, 0)
    assert (second.layers[0].removed, second.layers[0].regrown) == (0, 6)
    assert layer.layout.nnz == 32 and layer.layout.free_slots().size == 0
    assert sorted(layer.layout.slots.tolist()) == list(range(32))  # the freed slots were reused
    # the block weights stored there are fresh: zero weight (one step of training at most
    # would have moved them; the update ran after the last step), zero state, fresh gate
    assert torch.all(layer.weight[slots] == 0)
    for value in per_slot_state(opt, layer.weight).values():
        assert torch.all(value[slots] == 0)
    torch.testing.assert_close(layer.gate.prob_nonzero()[slots], torch.full((6,), 0.9, dtype=torch.float64))
    # the same seed gives the same decisions
    model2, *_ = run_random_regrowth(7, removal_seed)
    assert layer.layout == model2[0].layout


def test_gradient_regrowth_without_a_captured_batch_fails_clearly():
    model = make_model(fresh_seed(), (BlockLayout(np.eye(4, 8, dtype=bool), capacity=8), None))
    ctrl = DynamicSparsity(model, None, every=5, regrow="gradient", target_density=0.9)
    with pytest.raises(RuntimeError, match="captured"):
        ctrl.update()


# ------------------------------------------------------------------ compaction
def test_compact_shrinks_storage_and_remaps_the_optimizer():
    seed = fresh_seed()
    model = make_model(seed)
    opt = make_optimizer("adam", model)
    rng = np.random.default_rng(seed)
    layer = model[0]
    picks = rng.choice(32, size=20, replace=False)
    close_gates(layer, list(zip(layer.layout.entry_rows[picks], layer.layout.entry_cols[picks])))
    ctrl = DynamicSparsity(model, opt, every=1)
    train_step(model, opt, torch.randn(8, 32, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))
    ctrl.step()
    live = layer.layout.slots
    state_before = {k: v[live].clone() for k, v in per_slot_state(opt, layer.weight).items()}
    x = torch.randn(4, 32, dtype=torch.float64)
    model.eval()
    y = model(x)
    ctrl.compact()
    assert layer.weight.shape == (12, 8, 8) and layer.gate.log_alpha.shape == (12,)
    assert layer.layout.capacity == layer.layout.nnz == 12
    # same blocks and gates (torch's vectorized sigmoid may differ in the last bit when
    # the gate vector is shorter, hence the tolerance)
    torch.testing.assert_close(model(x), y, rtol=1e-13, atol=1e-15)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(layer.weight) in params and id(layer.gate.log_alpha) in params
    for k, v in per_slot_state(opt, layer.weight).items():
        assert torch.equal(v, state_before[k])
    model.train()
    train_step(model, opt, torch.randn(8, 32, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))
    assert opt.state[layer.weight]["exp_avg"].shape == (12, 8, 8)


# ------------------------------------------------------------------ resume
def run(model, opt, ctrl, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + 0.05 * learn.l0_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()


def build(seed):
    model = make_model(seed, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ctrl = DynamicSparsity(model, opt, every=4, threshold=0.5, regrow="gradient", seed=3)
    return model, opt, ctrl


def test_resume_from_state_dicts_equals_uninterrupted_run():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 32, generator=gen), torch.randint(0, 16, (16,), generator=gen)) for _ in range(16)]
    model, opt, ctrl = build(seed)
    with torch.no_grad():  # make some gates close early so that blocks are removed and regrown
        model[0].gate.log_alpha[:10] = -2.0
        model[2].gate.log_alpha[:5] = -2.0
    start = copy.deepcopy(model.state_dict())

    run(model, opt, ctrl, batches)
    assert sum(r.removed for r in ctrl.history) > 0 and sum(r.regrown for r in ctrl.history) > 0

    model_a, opt_a, ctrl_a = build(seed)
    model_a.load_state_dict(start)
    run(model_a, opt_a, ctrl_a, batches[:7])  # the next step is an update step
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "ctrl": ctrl_a.state_dict()}, buffer)
    del model_a, opt_a, ctrl_a

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, numbers and strings only
    model_b, opt_b, ctrl_b = build(seed + 1)  # different initial values: all must come from the checkpoint
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    ctrl_b.load_state_dict(saved["ctrl"])
    run(model_b, opt_b, ctrl_b, batches[7:])

    assert [r.as_dict() for r in ctrl_b.history] == [r.as_dict() for r in ctrl.history]
    for (_, a), (_, b) in zip(learn.gated_layers(model), learn.gated_layers(model_b)):
        assert a.layout == b.layout
    for (name, a), b in zip(model.state_dict().items(), model_b.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


# ------------------------------------------------------------------ API
def test_step_reports_only_on_update_steps_and_schedule():
    model = make_model(fresh_seed())
    opt = make_optimizer("sgd", model)
    ctrl = DynamicSparsity(model, opt, every=3, start=2, stop=9)
    got = []
    for _ in range(12):
        train_step(model, opt, torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64))
        report = ctrl.step()
        if report is not None:
            got.append(report.step)
            assert [r.name for r in report.layers] == ["0", "2"]
            assert report.density == pytest.approx(ctrl.density())
    assert got == [5, 8] and ctrl.updates == 2 and ctrl.steps == 12
    assert "density" in str(ctrl.history[0])


@pytest.mark.parametrize("kwargs, error", [
    ({"every": 0}, ValueError), ({"every": -3}, ValueError), ({"every": 2.0}, TypeError),
    ({"threshold": 0.0}, ValueError), ({"threshold": 1.0}, ValueError), ({"threshold": "0.2"}, TypeError),
    ({"regrow": "magnitude"}, ValueError), ({"target_density": 0.0}, ValueError),
    ({"target_density": 1.2}, ValueError), ({"seed": -1}, ValueError), ({"start": -1}, ValueError),
    ({"start": 5, "stop": 3}, ValueError),
])
def test_controller_rejects_bad_arguments(kwargs, error):
    model = make_model(0)
    with pytest.raises(error):
        DynamicSparsity(model, make_optimizer("sgd", model), **kwargs)


def test_controller_rejects_models_without_gates_and_bad_optimizers():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="gated layers"):
        DynamicSparsity(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    with pytest.raises(TypeError):
        DynamicSparsity(make_model(0), "adam")
    with pytest.raises(TypeError):
        DynamicSparsity("model", None)


def test_conv_gradient_regrowth_uses_the_dense_conv_weight_gradient():
    pytest.importorskip("numbasparse.nn_conv")
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 4)) < 0.4
    mask[0, 0] = True
    mask[1, 3] = False
    layout = BlockLayout(mask, rng.permutation(8)[:mask.sum()], 8)
    torch.manual_seed(seed)
    conv = learn.L0BlockSparseConv2d(16, 32, 3, layout, block_size=8, stride=2, padding=1, dtype=torch.float64)
    model = nn.Sequential(conv)
    opt = make_optimizer("adam", model)
    grow = 2
    ctrl = DynamicSparsity(model, opt, every=1, regrow="gradient", target_density=(layout.nnz + grow) / 8)
    captured = {}

    def hook(module, inputs, out):
        captured["x"] = inputs[0].detach()
        out.register_hook(lambda g: captured.update(dy=g.detach()))

    conv.register_forward_hook(hook)
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    out = model(x)
    loss = F.mse_loss(out, torch.randn_like(out))
    opt.zero_grad()
    loss.backward()
    opt.step()
    report = ctrl.step()

    # reference: dense conv weight gradient (out, in, kh, kw) of the same batch, by autograd
    dense = torch.zeros(32, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    F.conv2d(captured["x"], dense, stride=2, padding=1).backward(captured["dy"])
    norms = dense.grad.reshape(4, 8, 2, 8, 9).pow(2).sum(dim=(1, 3, 4)).sqrt().t().numpy()  # (in, out) blocks
    dead = np.flatnonzero(~mask.ravel())
    expected = set(dead[np.argsort(-norms.ravel()[dead], kind="stable")[:grow]].tolist())
    added = set(np.flatnonzero(conv.layout.mask.ravel() & ~mask.ravel()).tolist())
    assert report.regrown == grow and added == expected
    slots = [conv.layout.slot_of(*np.unravel_index(a, (2, 4))) for a in sorted(added)]
    assert set(slots) <= set(layout.free_slots().tolist())
    assert torch.all(conv.weight[slots] == 0)
    for value in per_slot_state(opt, conv.weight).values():
        assert torch.all(value[slots] == 0)
