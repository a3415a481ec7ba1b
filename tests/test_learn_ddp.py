"""DynamicSparsity under DistributedDataParallel: two CPU processes (gloo, 127.0.0.1)
keep identical layouts and train like one process on the whole batch."""
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import learn

WORLD = 2
STEPS = 12
BATCH = 16


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(seed):
    """Model, data and closed gates, identical in every process for a given seed."""
    torch.manual_seed(seed)
    model = nn.Sequential(learn.L0BlockSparseLinear(32, 64, block_size=8, dtype=torch.float64), nn.ReLU(),
                          learn.L0BlockSparseLinear(64, 16, block_size=8, dtype=torch.float64))
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # some gates start nearly closed, so blocks are removed and regrown
        model[0].gate.log_alpha[rng.choice(32, 8, replace=False)] = -2.0
        model[2].gate.log_alpha[rng.choice(16, 3, replace=False)] = -2.0
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(BATCH, 32, generator=gen, dtype=torch.float64),
                torch.randint(0, 16, (BATCH,), generator=gen)) for _ in range(STEPS)]
    return model, batches


def train(model, batches, rank=0, world=1):
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    ctrl = learn.DynamicSparsity(model, opt, every=3, threshold=0.5, regrow="gradient", seed=11)
    share = BATCH // world
    for x, y in batches:
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(xs), ys) + 0.05 * learn.l0_penalty(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctrl.step()
    return ctrl


def worker(rank, port, seed, path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import numbasparse

    numbasparse.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, batches = setup(seed)
        ddp = nn.parallel.DistributedDataParallel(model)
        ctrl = train(ddp, batches, rank, WORLD)
        tables = [layer.layout.slot_table.copy() for _, layer in learn.gated_layers(model)]
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, {"tables": tables, "mismatches": ctrl.sync_mismatches})
        if rank == 0:
            torch.save({"ranks": everyone, "state": model.state_dict(),
                        "history": [r.as_dict() for r in ctrl.history]}, path)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a process-group thread still joinable
    # at exit makes the C++ runtime abort (SIGABRT) after all the work is done.
    os._exit(0)


def test_ddp_two_processes_match_single_process(tmp_path):
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    model, batches = setup(seed)
    ctrl = train(model, batches)  # single process, whole batch (also warms numba's cache)
    assert sum(r.removed for r in ctrl.history) > 0 and sum(r.regrown for r in ctrl.history) > 0

    path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), seed, path), nprocs=WORLD, join=True)
    result = torch.load(path, weights_only=False)

    first = result["ranks"][0]
    for other in result["ranks"]:
        assert other["mismatches"] == 0  # every rank reached the same decisions on its own
        for a, b in zip(first["tables"], other["tables"]):
            np.testing.assert_array_equal(a, b)
    for (_, layer), table in zip(learn.gated_layers(model), first["tables"]):
        np.testing.assert_array_equal(layer.layout.slot_table, table)
    assert result["history"] == [r.as_dict() for r in ctrl.history]
    for name, value in model.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-9, atol=1e-11, msg=name)
