"""Per-slot optimizer state: a revived slot's state is what the optimizer gives a fresh
parameter, compaction gathers every state tensor that follows the slots (factored ones
too), and optimizers with other starting values can be declared."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import learn
from numbasparse import BlockLayout, BlockSparseLinear
from numbasparse.optim_state import follows_slots, register_initial_state, reset_slots

B = 8

# Optimizers whose fresh state is reached by one step with a zero gradient (their
# updates leave a zero-gradient state at its starting value), so a fresh optimizer
# stepped once on a zero gradient is the reference for "what it would have initialized".
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.25),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.03),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
}


def _layer(seed=0):
    torch.manual_seed(seed)
    return BlockSparseLinear(4 * B, 4 * B, np.ones((4, 4), dtype=bool), block_size=B)


def _train(layer, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer(torch.randn(5, 4 * B, generator=g)), torch.randn(5, 4 * B, generator=g)).backward()
        opt.step()


def _fresh_state(kind, like):
    """The state ``kind`` gives a fresh parameter shaped like ``like``."""
    param = torch.nn.Parameter(torch.randn_like(like))
    opt = OPTIMIZERS[kind]([param])
    param.grad = torch.zeros_like(param)
    opt.step()
    return opt.state[param]


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_revived_slots_get_the_optimizers_initial_state(kind):
    layer = _layer()
    opt = OPTIMIZERS[kind](layer.parameters())
    _train(layer, opt, 3)
    state = opt.state[layer.weight]
    slot_state = {k: v for k, v in state.items() if follows_slots(v, layer.weight)}
    assert slot_state, f"{kind} keeps no per-slot state"
    before = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    revived = torch.tensor([2, 5, 11])
    reset_slots(layer.weight, revived, opt)

    fresh = _fresh_state(kind, layer.weight)
    others = np.setdiff1d(np.arange(16), revived.numpy())
    for name, value in slot_state.items():
        expected = fresh[name][revived]
        assert torch.equal(value[revived], expected), f"{kind} {name}: {value[revived].flatten()[:3]} " \
                                                      f"!= fresh {expected.flatten()[:3]}"
        assert torch.equal(value[others], before[name][others]), f"{kind} {name}: other slots changed"
    for name, value in state.items():  # shared scalar state (Adam's step) is left alone
        if torch.is_tensor(value) and name not in slot_state:
            assert torch.equal(value, before[name])
    _train(layer, opt, 1, seed=1)      # and the optimizer goes on


def test_adagrad_initial_value_matches_what_adagrad_builds():
    """Adagrad creates its state at construction: the registered value is that one."""
    p = torch.nn.Parameter(torch.zeros(3, B, B))
    opt = torch.optim.Adagrad([p], initial_accumulator_value=0.7)
    assert torch.all(opt.state[p]["sum"] == 0.7)
    p.grad = torch.ones_like(p)
    opt.step()
    reset_slots(p, torch.tensor([1]), opt)
    assert torch.all(opt.state[p]["sum"][1] == 0.7) and torch.all(opt.state[p]["sum"][0] > 0.7)


@pytest.mark.parametrize("kind", ["rprop", "adagrad"])
def test_dynamic_sparsity_regrowth_restarts_state_at_initial_values(kind):
    torch.manual_seed(1)
    mask = np.ones((4, 4), dtype=bool)
    mask[3] = False                                   # 12 live blocks in slots 0..11 of 16
    layout = BlockLayout(mask, capacity=16)
    model = torch.nn.Sequential(learn.L0BlockSparseLinear(4 * B, 4 * B, layout, block_size=B, seed=1))
    layer = model[0]
    opt = OPTIMIZERS[kind](model.parameters())
    ctrl = learn.DynamicSparsity(model, opt, every=3, threshold=0.3, regrow="random", seed=0)
    ctrl.steps = 2
    g = torch.Generator().manual_seed(2)
    for _ in range(2):  # Rprop's step sizes move from the second step on
        opt.zero_grad()
        F.mse_loss(model(torch.randn(5, 4 * B, generator=g)), torch.randn(5, 4 * B, generator=g)).backward()
        opt.step()
    key, initial = ("step_size", 0.03) if kind == "rprop" else ("sum", 0.25)
    for param in (layer.weight, layer.gate.log_alpha):
        assert not torch.all(opt.state[param][key][:4] == initial)
    with torch.no_grad():  # the next update removes slots 0..3 and revives the 4 dead blocks there
        layer.gate.log_alpha[:4] = -8.0
    report = ctrl.step()
    assert report.removed == 4 and report.regrown == 4
    assert sorted(layer.layout.slot_table[3]) == [0, 1, 2, 3]
    for param in (layer.weight, layer.gate.log_alpha):
        assert torch.all(opt.state[param][key][:4] == initial)
        assert not torch.all(opt.state[param][key][4:12] == initial)


def test_compaction_gathers_factored_state():
    """Adafactor keeps (slots, B, 1) row and (slots, 1, B) column variances."""
    torch.manual_seed(3)
    mask = np.random.default_rng(3).random((4, 4)) < 0.6
    layer = BlockSparseLinear(4 * B, 4 * B, BlockLayout(mask, capacity=int(mask.sum()) + 2), block_size=B)
    opt = torch.optim.Adafactor(layer.parameters(), lr=0.01)
    _train(layer, opt, 2)
    state = opt.state[layer.weight]
    assert state["row_var"].shape == (layer.layout.capacity, B, 1)
    live = torch.from_numpy(layer.layout.slots)
    expected = {k: state[k][live].clone() for k in ("row_var", "col_var")}
    layer.compact(opt)
    for name, value in expected.items():
        assert torch.equal(opt.state[layer.weight][name], value), name
    _train(layer, opt, 1, seed=1)


def test_optimizers_with_other_starting_values_can_be_declared():
    class Offset(torch.optim.SGD):
        """SGD whose momentum buffer starts at 0.5 (for the test)."""

    register_initial_state(Offset, "momentum_buffer", lambda group: group["lr"] * 5)
    layer = _layer()
    opt = Offset(layer.parameters(), lr=0.1, momentum=0.9)
    _train(layer, opt, 2)
    reset_slots(layer.weight, torch.tensor([0, 3]), opt)
    assert torch.all(opt.state[layer.weight]["momentum_buffer"][[0, 3]] == 0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        register_initial_state(dict, "x", lambda group: 0)
    with pytest.raises(TypeError, match="callable"):
        register_initial_state(Offset, "x", 0.5)


def test_compact_checks_the_optimizer_argument():
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, a list or tuple"):
        _layer().compact("adam")
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="the sequence holds a str"):
        layer.compact([opt, "adam"])
    with pytest.raises(ValueError, match="listed twice"):
        layer.compact([opt, opt])
    with pytest.raises(TypeError, match="a list or tuple of them"):
        learn.DynamicSparsity(learn.L0BlockSparseLinear(2 * B, 2 * B, block_size=B), {"opt": opt})


def _gated_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B, seed=seed), torch.nn.ReLU(),
                               learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B, seed=seed + 1))


def test_parameters_split_over_several_optimizers_are_all_followed():
    """Weights in one optimizer, gates in another (a list given to the controller): both
    get their removed slots reset and their state gathered on compaction, and both keep
    stepping afterwards (the pre-step check would raise for a stale one)."""
    model = _gated_model()
    gates = learn.gate_parameters(model)
    gate_ids = {id(p) for p in gates}
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    opt_w = torch.optim.Adam(weights, lr=0.01)
    opt_g = torch.optim.SGD(gates, lr=0.1, momentum=0.9)
    ctrl = learn.DynamicSparsity(model, [opt_w, opt_g], every=1, target_density=0.5, ramp=0)

    def step():
        x = torch.randn(6, 4 * B)
        loss = model(x).square().mean() + learn.l0_penalty(model, target_density=0.5)
        opt_w.zero_grad(); opt_g.zero_grad()
        loss.backward()
        opt_w.step(); opt_g.step()
        return ctrl.step()

    report = step()
    assert report.removed > 0
    for _, layer in ctrl.layers():
        freed = np.setdiff1d(np.arange(layer.layout.capacity), layer.layout.entry_slots)
        assert freed.size
        assert torch.all(opt_w.state[layer.weight]["exp_avg"][freed] == 0)
        assert torch.all(opt_w.state[layer.weight]["exp_avg_sq"][freed] == 0)
        assert torch.all(opt_g.state[layer.gate.log_alpha]["momentum_buffer"][freed] == 0)
    live_state = {id(layer): (opt_w.state[layer.weight]["exp_avg"][layer.layout.entry_slots.tolist()].clone(),
                              opt_g.state[layer.gate.log_alpha]["momentum_buffer"][layer.layout.entry_slots.tolist()].clone())
                  for _, layer in ctrl.layers()}
    ctrl.compact()
    for _, layer in ctrl.layers():
        exp_avg, momentum = live_state[id(layer)]
        assert layer.layout.capacity == layer.layout.nnz
        assert torch.equal(opt_w.state[layer.weight]["exp_avg"], exp_avg)
        assert torch.equal(opt_g.state[layer.gate.log_alpha]["momentum_buffer"], momentum)
    step()  # both optimizers step on the compacted storage
