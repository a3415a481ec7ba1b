"""FSDP (``fully_shard``) over block-sparse and gated layers: two CPU processes (gloo,
127.0.0.1) train like one process on the whole batch, and DynamicSparsity keeps the
same layouts on every rank."""
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import learn
import numbasparse
from test_learn_ddp import free_port

WORLD = 2
STEPS = 10
BATCH = 16


def setup(seed):
    """Model (a plain block-sparse layer between two gated ones) and data, identical in
    every process for a given seed; some gates start nearly closed."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        learn.L0BlockSparseLinear(32, 64, block_size=8, seed=seed, dtype=torch.float64), nn.ReLU(),
        numbasparse.BlockSparseLinear(64, 64, numbasparse.layouts.random(8, 8, 0.5, seed=seed), block_size=8,
                                      dtype=torch.float64), nn.ReLU(),
        learn.L0BlockSparseLinear(64, 16, block_size=8, seed=seed + 1, dtype=torch.float64))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        model[0].gate.log_alpha[rng.choice(32, 8, replace=False)] = -2.0
        model[4].gate.log_alpha[rng.choice(16, 3, replace=False)] = -2.0
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(BATCH, 32, generator=gen, dtype=torch.float64),
                torch.randint(0, 16, (BATCH,), generator=gen)) for _ in range(STEPS)]
    return model, batches


def train(model, batches, rank=0, world=1):
    """Per-step losses of this rank's share of each batch, and the controller."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    controller = learn.DynamicSparsity(model, optimizer, every=3, threshold=0.5, regrow="random", seed=5)
    share = BATCH // world
    losses = []
    for x, y in batches:
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(model(xs), ys) + 0.05 * learn.l0_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step()
        losses.append(loss.item())
    return losses, controller


def worker(rank, port, seed, path):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    numbasparse.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model, batches = setup(seed)
        for index in (0, 2, 4):
            fully_shard(model[index])
        fully_shard(model)
        losses, controller = train(model, batches, rank, WORLD)
        tables = [layer.layout.slot_table.copy() for _, layer in learn.gated_layers(model)]
        state = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, {"tables": tables, "losses": losses,
                                          "mismatches": controller.sync_mismatches})
        if rank == 0:
            torch.save({"ranks": everyone, "state": state, "history": [r.as_dict() for r in controller.history]},
                       path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_fsdp_two_processes_match_single_process(tmp_path):
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    print("seed", seed)
    model, batches = setup(seed)
    losses, controller = train(model, batches)
    assert sum(r.removed for r in controller.history) > 0 and sum(r.regrown for r in controller.history) > 0

    path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), seed, path), nprocs=WORLD, join=True)
    result = torch.load(path, weights_only=False)

    ranks = result["ranks"]
    for other in ranks:
        assert other["mismatches"] == 0
        for a, b in zip(ranks[0]["tables"], other["tables"]):
            np.testing.assert_array_equal(a, b)
    for (_, layer), table in zip(learn.gated_layers(model), ranks[0]["tables"]):
        np.testing.assert_array_equal(layer.layout.slot_table, table)
    assert result["history"] == [r.as_dict() for r in controller.history]
    sharded = np.mean([r["losses"] for r in ranks], axis=0)   # equal halves: their mean is the batch loss
    np.testing.assert_allclose(sharded, losses, rtol=1e-9)
    for name, value in model.named_parameters():
        torch.testing.assert_close(result["state"][name], value.detach(), rtol=1e-9, atol=1e-11, msg=name)
