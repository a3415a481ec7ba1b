"""Forked processes: after the parent ran the kernels (on several threads), forked
children, DataLoader workers and fork-started multiprocessing pools run them too and
get the parent's results (the matmul cases are in test_cpu_kernels.py)."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import learn
import numbasparse
from numbasparse import BlockSparseConv2d, layouts
from numbasparse.kernels.cpu import runtime

from helpers import run_in_forked_child

B = 8


@pytest.fixture
def always_parallel(monkeypatch):
    """Every call, however small, on several threads (in the parent and its children)."""
    monkeypatch.setattr(runtime, "SERIAL_WORK", 0)
    numbasparse.set_num_threads(2)
    yield
    numbasparse.set_num_threads(None)


def _conv_results(seed):
    """Output and gradients of a block-sparse conv, as numpy arrays."""
    torch.manual_seed(seed)
    conv = BlockSparseConv2d(4 * B, 3 * B, 3, layouts.random(4, 3, 0.6, seed=seed), block_size=B, padding=1)
    x = torch.randn(3, 4 * B, 9, 7, requires_grad=True)
    y = conv(x)
    y.backward(torch.ones_like(y))
    return [t.detach().numpy().copy() for t in (y, x.grad, conv.weight.grad)]


def _l0_training_step(seed):
    """Parameters of a small gated conv + linear model after one Adam step."""
    torch.manual_seed(seed)
    conv = learn.L0BlockSparseConv2d(2 * B, 2 * B, 3, block_size=B, padding=1, seed=seed)
    linear = learn.L0BlockSparseLinear(2 * B, 2 * B, block_size=B, seed=seed)
    model = torch.nn.ModuleDict({"conv": conv, "linear": linear})
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(4, 2 * B, 6, 6)
    h = torch.relu(conv(x)).mean(dim=(2, 3))
    loss = F.mse_loss(linear(h), torch.zeros(4, 2 * B)) + 0.01 * learn.l0_penalty(model)
    loss.backward()
    opt.step()
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_forked_child_runs_the_conv_kernels(always_parallel):
    parent = _conv_results(5)
    for a, b in zip(parent, run_in_forked_child(_conv_results, 5)):
        assert np.array_equal(a, b)


class _ConvFeatures(torch.utils.data.Dataset):
    """Items computed by a block-sparse conv layer (in the worker processes)."""

    def __init__(self):
        torch.manual_seed(0)
        self.conv = BlockSparseConv2d(2 * B, 2 * B, 3, layouts.random(2, 2, 0.75, seed=1), block_size=B)

    def __len__(self):
        return 12

    def __getitem__(self, index):
        x = torch.randn(1, 2 * B, 6, 6, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            return self.conv(x)[0]


def test_dataloader_fork_workers_run_a_conv_dataset(always_parallel):
    data = _ConvFeatures()
    expected = torch.stack([data[i] for i in range(len(data))])   # the parent uses the kernels first
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork")
    got = torch.cat(list(loader))
    assert torch.equal(got, expected)


def test_fork_pool_trains_gated_layers(always_parallel):
    seeds = [1, 2, 3]
    expected = [_l0_training_step(s) for s in seeds]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map_async(_l0_training_step, seeds).get(timeout=180)
    for want, got in zip(expected, results):
        for a, b in zip(want, got):
            assert np.array_equal(a, b)


def _child_threads():
    big = torch.rand(2_000_000)
    return torch.get_num_threads(), runtime.get_num_threads(), float(big.sqrt().sum()), float(big.sum())


@pytest.mark.skipif(runtime.backend_name() != "openmp", reason="torch here has no OpenMP team")
def test_child_forked_after_the_team_ran_keeps_torch_usable(always_parallel):
    """GNU OpenMP cannot run a parallel region in a child forked after the parent ran
    one on several threads: torch's own operators would wait forever there.  The child
    gets one torch thread (as DataLoader workers do) and keeps the kernels' count asked
    with set_num_threads (the fixture asked for 2)."""
    _conv_results(6)                      # the parent's kernels ran on torch's team
    torch_threads, kernel_threads, root_sum, total = run_in_forked_child(_child_threads)
    assert torch_threads == 1 and kernel_threads == 2
    assert abs(root_sum / 2_000_000 - 2 / 3) < 0.01 and abs(total / 2_000_000 - 0.5) < 0.01
    assert torch.get_num_threads() >= 1 and runtime.get_num_threads() == 2  # the parent unchanged


class _ThreadCounts(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return torch.tensor([torch.get_num_threads(), runtime.get_num_threads()])


@pytest.mark.skipif(runtime.backend_name() != "openmp", reason="torch here has no OpenMP team")
def test_dataloader_workers_follow_torchs_thread_count(monkeypatch):
    """Without a count asked for, the kernels in a worker use torch's (1 in a worker):
    the workers do not oversubscribe the machine."""
    monkeypatch.setattr(runtime, "SERIAL_WORK", 0)
    numbasparse.set_num_threads(None)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _conv_results(7)                      # the parent's kernels ran on torch's team
        loader = torch.utils.data.DataLoader(_ThreadCounts(), batch_size=1, num_workers=2,
                                             multiprocessing_context="fork")
        for counts in loader:
            assert counts.tolist() == [[1, 1]]
    finally:
        torch.set_num_threads(previous)
