"""Ctrl-C (SIGINT, ``KeyboardInterrupt``) at any point: the controller, the layers and
the optimizer are found as before the interrupted call or as after it, and no
process-wide setting is left changed."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import learn
import numbasparse
from numbasparse import optim_state, storage
from numbasparse.kernels.cpu import runtime

B = 8


def _settings():
    return (signal.getsignal(signal.SIGINT), numbasparse.get_num_threads(), torch.get_num_threads(),
            runtime._requested_threads)


def _setup():
    """Two gated layers with Adam state, a controller whose next step is an update that
    removes blocks of both layers."""
    torch.manual_seed(0)
    model = nn.Sequential(learn.L0BlockSparseLinear(4 * B, 4 * B, block_size=B, seed=1), nn.ReLU(),
                          learn.L0BlockSparseLinear(4 * B, 2 * B, block_size=B, seed=2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ctrl = learn.DynamicSparsity(model, opt, every=2, threshold=0.3)
    x, y = torch.randn(6, 4 * B), torch.randn(6, 2 * B)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if ctrl.steps == 0:
            ctrl.step()
    with torch.no_grad():
        model[0].gate.log_alpha[:3] = -8.0
        model[2].gate.log_alpha[:2] = -8.0
    return model, opt, ctrl


def _snapshot(model, opt, ctrl):
    tensors = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    layouts = [layer.layout for _, layer in ctrl.layers()]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return ctrl.steps, ctrl.updates, len(ctrl.history), layouts, tensors, state


def _same(a, b):
    assert a[:3] == b[:3]
    assert a[3] == b[3]
    for key in a[4]:
        assert torch.equal(a[4][key], b[4][key]), key
    for pid in a[5]:
        for key in a[5][pid]:
            assert torch.equal(a[5][pid][key], b[5][pid][key])


def _sigint_on_call(monkeypatch, owner, name, when=1):
    """Make the ``when``-th call of ``owner.name`` deliver a real SIGINT first."""
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_interrupt_while_planning_changes_nothing(monkeypatch):
    model, opt, ctrl = _setup()
    settings = _settings()
    before = _snapshot(model, opt, ctrl)
    _sigint_on_call(monkeypatch, ctrl, "_plan_removal")
    with pytest.raises(KeyboardInterrupt):
        ctrl.step()
    _same(_snapshot(model, opt, ctrl), before)
    assert _settings() == settings
    monkeypatch.undo()
    report = ctrl.step()                      # the same update runs when the loop resumes
    assert report is not None and report.step == 2 and report.removed == 5


@pytest.mark.parametrize("when", [1, 2], ids=["first-layer", "second-layer"])
def test_interrupt_while_installing_layouts_completes_the_update(monkeypatch, when):
    model, opt, ctrl = _setup()
    settings = _settings()
    calls = _sigint_on_call(monkeypatch, ctrl, "_apply", when)
    with pytest.raises(KeyboardInterrupt):
        ctrl.step()
    assert len(calls) == 2, "the interrupt cut the update short"
    assert ctrl.steps == 2 and ctrl.updates == 1 and len(ctrl.history) == 1
    assert ctrl.history[0].removed == 5
    for _, layer in ctrl.layers():
        assert layer.layout.nnz == layer.layout.capacity - np.count_nonzero(layer.gate.log_alpha.detach() < -10)
    assert _settings() == settings


@pytest.mark.parametrize("when", [1, 2], ids=["weight", "gates"])
def test_interrupt_while_compacting_completes_the_compaction(monkeypatch, when):
    model, opt, ctrl = _setup()
    ctrl.step()
    settings = _settings()
    calls = _sigint_on_call(monkeypatch, storage, "gather_slots", when)
    with pytest.raises(KeyboardInterrupt):
        ctrl.compact()
    assert len(calls) == 4
    for _, layer in ctrl.layers():
        assert layer.weight.shape[0] == layer.gate.log_alpha.shape[0] == layer.gate.n == layer.layout.capacity
        assert layer.layout.nnz == layer.layout.capacity
    optim_state.check_optimizer_state(opt)
    model(torch.randn(2, 4 * B)).sum().backward()
    opt.step()
    assert _settings() == settings


def test_interrupt_while_loading_a_checkpoint_completes_the_layer(monkeypatch):
    model, opt, ctrl = _setup()
    ctrl.step()
    ctrl.compact()
    saved = model.state_dict()
    fresh, _, _ = _setup()
    _sigint_on_call(monkeypatch, storage, "resize_slots", 1)
    with pytest.raises(KeyboardInterrupt):
        fresh[0].load_state_dict({k[2:]: v for k, v in saved.items() if k.startswith("0.")})
    layer = fresh[0]
    assert layer.layout == model[0].layout
    assert torch.equal(layer.weight, model[0].weight) and torch.equal(layer.gate.log_alpha, model[0].gate.log_alpha)


def test_interrupt_in_the_thread_pool_waits_for_the_helpers():
    """The helper threads use the caller's arrays: a caller interrupted while it waits
    for them must not leave before they are done."""
    pool = runtime._ThreadPool()
    done = []

    def call(arg):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
            done.append(arg)

    interrupt = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    settings = _settings()
    interrupt.start()
    with pytest.raises(KeyboardInterrupt):
        pool.run(call, 7, 2)      # the caller's share is done at once; it waits for the helpers
    interrupt.join()
    assert done == [7, 7]
    assert _settings() == settings


def test_interrupt_between_kernel_calls_leaves_settings_and_results(monkeypatch):
    numbasparse.set_num_threads(2)
    try:
        settings = _settings()
        layer = numbasparse.BlockSparseLinear(4 * B, 4 * B, np.eye(4, dtype=bool), block_size=B)
        x = torch.randn(64, 4 * B)
        expected = layer(x)
        _sigint_on_call(monkeypatch, runtime, "_launch")
        with pytest.raises(KeyboardInterrupt):
            layer(x)
        monkeypatch.undo()
        assert _settings() == settings
        assert torch.equal(layer(x), expected)
    finally:
        numbasparse.set_num_threads(None)
