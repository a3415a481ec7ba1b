"""RowSparseAdam: the update of torch.optim.SparseAdam on the rows a sparse gradient
names (numba on CPUs), the dense Adam update for dense gradients, checkpoints, errors."""
from __future__ import annotations

import io

import pytest
import torch

from numbasparse import LSHOutputLayer, RowSparseAdam, sampled_softmax_loss


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True).coalesce()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(40, 7), (40,), (33, 2, 3)], ids=["matrix", "vector", "3d"])
def test_matches_sparse_adam_on_row_gradients(dtype, tol, shape):
    gen = torch.Generator().manual_seed(0)
    ours = torch.randn(shape, dtype=dtype, generator=gen).requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    opt, ref_opt = RowSparseAdam([ours], lr=0.05, betas=(0.8, 0.99), eps=1e-6), \
        torch.optim.SparseAdam([ref], lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    untouched_before = None
    for step in range(6):
        rows = torch.randperm(shape[0], generator=gen)[:9].sort().values
        values = torch.randn((9, *shape[1:]), dtype=dtype, generator=gen) * (10.0 ** (step - 3))
        ours.grad = _sparse(rows, values, shape)
        ref.grad = ours.grad.clone()
        if step == 5:
            untouched = torch.ones(shape[0], dtype=torch.bool)
            untouched[rows] = False
            untouched_before = ours.detach()[untouched].clone()
            m_before = opt.state[ours]["exp_avg"][untouched].clone()
        opt.step()
        ref_opt.step()
        assert (ours - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    assert torch.equal(ours.detach()[untouched], untouched_before)          # rows without a gradient stay put
    assert torch.equal(opt.state[ours]["exp_avg"][untouched], m_before)     # and their moments too (lazy)
    assert opt.state[ours]["step"] == 6


def test_dense_gradient_updates_every_row():
    gen = torch.Generator().manual_seed(1)
    ours = torch.randn(12, 5, dtype=torch.float64, generator=gen).requires_grad_()
    ref = ours.detach().clone().requires_grad_()
    adam = ours.detach().clone().requires_grad_()
    opt, ref_opt = RowSparseAdam([ours], lr=0.01), torch.optim.SparseAdam([ref], lr=0.01)
    adam_opt = torch.optim.Adam([adam], lr=0.01)
    for _ in range(4):
        g = torch.randn(12, 5, dtype=torch.float64, generator=gen)
        ours.grad, adam.grad = g.clone(), g.clone()
        ref.grad = _sparse(torch.arange(12), g.clone(), (12, 5))
        opt.step()
        ref_opt.step()
        adam_opt.step()
    assert torch.allclose(ours, ref, atol=1e-14, rtol=0)
    # Adam adds eps to sqrt(v_hat), SparseAdam (and this) to sqrt(v): a difference of order lr * eps / sqrt(1 - b2)
    assert torch.allclose(ours, adam, atol=1e-5, rtol=0) and (ours - adam).abs().max() > 0


def test_trains_the_lsh_layer_and_checkpoints_exactly():
    torch.manual_seed(0)
    layer = LSHOutputLayer(32, 256, block_size=8, active_blocks=4, tables=4, bits=5, sparse_grad=True, seed=0)
    x, y = torch.randn(16, 32), torch.randint(0, 256, (16,))
    opt = RowSparseAdam(layer.parameters(), lr=0.05)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, ids = layer(x, y)
        loss = sampled_softmax_loss(logits, ids, y, 8)
        loss.backward()
        opt.step()
        return loss.item()

    losses = [step() for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0]
    buffer = io.BytesIO()
    torch.save({"layer": layer.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    after = [step() for _ in range(3)]
    torch.manual_seed(0)
    layer2 = LSHOutputLayer(32, 256, block_size=8, active_blocks=4, tables=4, bits=5, sparse_grad=True, seed=7)
    opt2 = RowSparseAdam(layer2.parameters(), lr=0.05)
    layer2.load_state_dict(saved["layer"])
    opt2.load_state_dict(saved["opt"])
    layer, opt = layer2, opt2
    assert [step() for _ in range(3)] == after                               # resumes to the bit


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be"), ({"lr": float("nan")}, "lr must be"), ({"betas": (0.9, 1.0)}, "betas must"),
    ({"betas": (0.9,)}, "betas must"), ({"eps": 0.0}, "eps must"), ({"lr": True}, "lr must be"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RowSparseAdam([torch.zeros(3, requires_grad=True)], **kwargs)


def test_gradient_with_two_sparse_dimensions_is_refused():
    p = torch.zeros(4, 4, requires_grad=True)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 3]]), torch.ones(2), (4, 4), check_invariants=True)
    with pytest.raises(ValueError, match="one sparse dimension"):
        RowSparseAdam([p]).step()


def test_scalar_parameter_with_dense_gradient():
    p = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ref = p.detach().clone().requires_grad_()
    opt, ref_opt = RowSparseAdam([p], lr=0.1), torch.optim.Adam([ref], lr=0.1)
    for g in (1.0, -0.5, 0.25):
        p.grad, ref.grad = torch.tensor(g, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        opt.step()
        ref_opt.step()
    assert p.shape == () and torch.allclose(p, ref, atol=1e-6) and p.item() != 2.0
