"""LSHOutputLayer and sampled_softmax_loss: sampled logits and their gradients (dense and
sparse) against a float64 dense reference, the block choice (shape, uniqueness, forced
label blocks, recall on inputs parallel to neurons), rehashing, checkpoints and errors."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, raises, randn

from numbasparse import LSHOutputLayer, sampled_softmax_loss  # noqa: E402

C, K, B = 16, 128, 8                       # 16 blocks of 8 neurons


def _layer(dtype=torch.float64, **kw):
    args = dict(block_size=B, active_blocks=4, tables=4, bits=6, rehash_every=3, seed=1, dtype=dtype)
    args.update(kw)
    return LSHOutputLayer(C, K, **args)


def _labels(n, seed, high=K):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


def _columns(ids):
    """(N, A*B) neuron ids of the sampled logits."""
    return (ids[:, :, None] * B + torch.arange(B)).reshape(ids.shape[0], -1)


def _check_tables(layer):
    """sorted_ids / bucket_ptr are the SimHash tables of the current weights (float64 codes)."""
    w, planes = layer.weight.detach().double(), layer.planes.double()
    signs = ((w @ planes) > 0).view(K, layer.tables, layer.bits).long()
    codes = (signs << torch.arange(layer.bits)).sum(2)                    # (K, L)
    sorted_ids, ptr = layer.sorted_ids.long(), layer.bucket_ptr.long()
    assert sorted_ids.shape == (layer.tables, K) and ptr.shape == (layer.tables, 2 ** layer.bits + 1)
    for t in range(layer.tables):
        assert torch.equal(sorted_ids[t].sort().values, torch.arange(K))        # a permutation
        in_order = codes[sorted_ids[t], t]
        assert torch.all(in_order[1:] >= in_order[:-1])
        counts = torch.bincount(codes[:, t], minlength=2 ** layer.bits)
        assert torch.equal(ptr[t], torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


# ------------------------------------------------------------------ logits and gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_logits_and_gradients_match_dense(sparse_grad, dtype):
    layer = _layer(dtype, sparse_grad=sparse_grad, active_blocks=3)
    N = 6
    x = randn((N, C), dtype, 2, requires_grad=True)
    labels = _labels(N, 3)
    logits, ids = layer(x, labels)
    assert logits.shape == (N, 3 * B) and logits.dtype == dtype
    cols = _columns(ids)
    assert_close(logits, layer.full_logits(x).gather(1, cols), dtype, "logits vs full_logits")
    loss = sampled_softmax_loss(logits, ids, labels, B)
    loss.backward()

    x64 = x.detach().double().requires_grad_(True)
    w64 = layer.weight.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True)
    restricted = (x64 @ w64.t() + b64).gather(1, cols)
    hit = cols == labels[:, None]
    assert hit.any(1).all()
    loss_ref = F.cross_entropy(restricted, hit.int().argmax(1))
    assert_close(logits, restricted, dtype, "logits")
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * abs(loss_ref.item())
    dx, dw, db = torch.autograd.grad(loss_ref, (x64, w64, b64))
    assert layer.weight.grad.is_sparse == sparse_grad and layer.bias.grad.is_sparse == sparse_grad
    assert_close(x.grad, dx, dtype, "dx")
    assert_close(layer.weight.grad.to_dense(), dw, dtype, "dweight")
    assert_close(layer.bias.grad.to_dense(), db, dtype, "dbias")
    unchosen = torch.ones(K, dtype=torch.bool)
    unchosen[cols.flatten()] = False
    assert unchosen.any() and torch.all(layer.weight.grad.to_dense()[unchosen] == 0)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_logits_of_repeated_blocks_and_expanded_grad(sparse_grad):
    layer = _layer(torch.float64, sparse_grad=sparse_grad)
    ids = torch.tensor([[2, 2, 0, 7], [7, 2, 2, 2], [0, 0, 0, 0]])     # repeats within and across rows
    x = randn((3, C), torch.float64, 21, requires_grad=True)
    logits = layer.logits_of(x, ids)
    (logits.sum() + 2 * logits[1].sum()).backward()                    # dy built from expanded tensors
    x64, w64, b64 = (t.detach().clone().requires_grad_(True) for t in (x, layer.weight, layer.bias))
    ref = (x64 @ w64.t() + b64).gather(1, _columns(ids))
    assert_close(logits, ref, torch.float64, "logits")
    (ref.sum() + 2 * ref[1].sum()).backward()
    assert_close(x.grad, x64.grad, torch.float64, "dx")
    assert_close(layer.weight.grad.to_dense(), w64.grad, torch.float64, "dweight")
    assert_close(layer.bias.grad.to_dense(), b64.grad, torch.float64, "dbias")
    assert torch.all(layer.bias.grad.to_dense()[3 * B:7 * B] == 0)


def test_sparse_adam_updates_only_chosen_rows():
    layer = _layer(torch.float32, sparse_grad=True)
    opt = torch.optim.SparseAdam(layer.parameters(), lr=0.01)
    x, labels = randn((5, C), torch.float32, 4), _labels(5, 5)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    logits, ids = layer(x, labels)
    sampled_softmax_loss(logits, ids, labels, B).backward()
    opt.step()
    chosen = torch.zeros(K, dtype=torch.bool)
    chosen[_columns(ids).flatten()] = True
    assert 0 < chosen.sum() < K
    assert torch.equal((layer.weight.detach() != w0).any(1), chosen)
    assert torch.equal(layer.bias.detach() != b0, chosen)


# ------------------------------------------------------------------ block choice
@pytest.mark.parametrize("bits,active", [(1, 4), (6, 4), (16, 4), (6, 16), (16, 16)])
def test_block_ids_shape_unique_in_range(bits, active):
    layer = _layer(torch.float32, bits=bits, active_blocks=active)
    x = randn((9, C), torch.float32, 6)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        _, ids = layer(x, _labels(9, 7))
        assert ids.shape == (9, active) and ids.dtype == torch.int64
        assert ids.min() >= 0 and ids.max() < K // B
        for row in ids.tolist():
            assert len(set(row)) == active, row


def test_label_blocks_forced_in_training_only():
    layer = _layer(torch.float32, active_blocks=2)
    N = 16
    x, labels = randn((N, C), torch.float32, 8), _labels(N, 9)
    label_in = lambda ids: (ids == (labels // B)[:, None]).any(1)  # noqa: E731
    _, ids = layer(x, labels)
    assert label_in(ids).all()
    layer.eval()
    _, ids = layer(x, labels)
    assert not label_in(ids).all(), "eval mode must not force the label blocks"
    # with active_blocks = 2 of 16, hashing alone misses most labels here
    assert label_in(ids).float().mean() < 0.5


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_recall_on_inputs_parallel_to_neurons(noise):
    # Measured (torch seed 1, layer seed 1, 64 blocks, A=4, L=8, bits=8, 32 rows): the chosen
    # blocks contain block k//B for 32/32 rows at noise 0.0 and 29/32 at noise 0.3 (angle ~17 deg;
    # 26/32 at 0.6); chance is 4/64 = 0.0625.
    torch.manual_seed(1)                        # the weights come from torch's global generator, as nn.Linear's
    layer = LSHOutputLayer(64, 512, block_size=8, active_blocks=4, tables=8, bits=8, seed=1)
    layer.eval()
    g = torch.Generator().manual_seed(5)
    k = torch.randint(0, 512, (32,), generator=g)
    with torch.no_grad():
        w = layer.weight[k]
        direction = torch.randn(32, 64, generator=g)
        x = 10 * (w + noise * w.norm(dim=1, keepdim=True) * direction / direction.norm(dim=1, keepdim=True))
    hit = (layer.choose(x) == (k // 8)[:, None]).any(1).float().mean().item()
    stats = layer.recall(x, k)
    assert stats["chance"] == 4 / 64
    assert hit >= 0.9 and stats["label_block"] >= 0.9 and stats["top_block"] >= 0.9, (hit, stats)


# ------------------------------------------------------------------ rehash
def test_rehash_every_n_training_calls():
    layer = _layer(torch.float64, rehash_every=3)
    x, labels = randn((4, C), torch.float64, 10), _labels(4, 11)
    assert layer.sorted_ids.numel() == 0 and int(layer.steps) == 0
    layer(x, labels)                           # step 0: tables built
    assert int(layer.steps) == 1
    _check_tables(layer)
    first = layer.sorted_ids.clone()
    with torch.no_grad():
        layer.weight.mul_(-1)                  # every code bit flips: buckets reversed
    layer(x, labels)
    layer(x, labels)                           # steps 1 and 2: no rehash
    layer.eval()
    layer(x, labels)                           # eval calls do not count
    layer.train()
    with torch.no_grad():
        layer(x, labels)                       # nor calls without grad
    assert int(layer.steps) == 3 and torch.equal(layer.sorted_ids, first)
    layer(x, labels)                           # step 3: rehash
    assert int(layer.steps) == 4
    assert not torch.equal(layer.sorted_ids, first)
    _check_tables(layer)


# ------------------------------------------------------------------ checkpoints
def _trained(seed=1):
    layer = _layer(torch.float32, seed=seed)
    x, labels = randn((6, C), torch.float32, 12), _labels(6, 13)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(4):                          # rehash at step 0 and 3, weights move between
        opt.zero_grad()
        logits, ids = layer(x, labels)
        sampled_softmax_loss(logits, ids, labels, B).backward()
        opt.step()
    return layer, x


def _same_choice(a, b, x):
    a.eval(), b.eval()                          # the random fill's generator travels in the checkpoint
    la, ia = a(x)
    lb, ib = b(x)
    assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_state_dict_round_trip_weights_only():
    layer, x = _trained()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = _layer(torch.float32, seed=2)       # other planes and weights until loaded
    fresh.load_state_dict(state)
    for name in ("weight", "bias", "planes", "steps", "sorted_ids", "bucket_ptr"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name)), name
    _same_choice(layer, fresh, x)


def test_state_dict_without_tables_rebuilds_from_loaded_weights():
    layer, x = _trained()
    with torch.no_grad():
        layer.weight.mul_(-1)
    layer.rehash()                              # tables of the final weights
    state = {k: v for k, v in layer.state_dict().items() if k not in ("sorted_ids", "bucket_ptr")}
    fresh = _layer(torch.float32, seed=2)
    fresh.choose(x)                             # fresh has tables of its own weights
    result = fresh.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["bucket_ptr", "sorted_ids"]
    _same_choice(layer, fresh, x)
    _check_tables(fresh)
    assert torch.equal(fresh.sorted_ids, layer.sorted_ids) and torch.equal(fresh.bucket_ptr, layer.bucket_ptr)


# ------------------------------------------------------------------ sampled_softmax_loss
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sampled_softmax_loss_is_restricted_cross_entropy(reduction):
    full = randn((5, K), torch.float64, 14)
    ids = torch.tensor([[3, 0, 7], [1, 2, 3], [15, 14, 0], [5, 5, 6], [9, 8, 4]])
    labels = torch.tensor([3 * B + 2, 2 * B, 0 * B + 7, 6 * B + 1, 9 * B + 5])
    cols = _columns(ids)
    target = torch.tensor([2, B, 2 * B + 7, 2 * B + 1, 5])
    assert torch.equal(cols.gather(1, target[:, None])[:, 0], labels)
    got = sampled_softmax_loss(full.gather(1, cols), ids, labels, B, reduction=reduction)
    ref = F.cross_entropy(full.gather(1, cols), target, reduction=reduction)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)


def test_sampled_softmax_loss_errors():
    ids = torch.tensor([[0, 1], [2, 3]])
    logits = randn((2, 2 * B), torch.float32, 15)
    raises(ValueError, r"row 1's label 40 is not in its blocks", sampled_softmax_loss, logits, ids,
           torch.tensor([3, 40]), B)
    raises(ValueError, r"logits must be \(N, A\*B\)", sampled_softmax_loss, logits[:, :B], ids,
           torch.tensor([3, 17]), B)
    raises(ValueError, r"logits must be \(N, A\*B\)", sampled_softmax_loss, logits, ids[:1], torch.tensor([3, 17]), B)
    raises(ValueError, r"labels must have shape \(N,\) = \(2,\)", sampled_softmax_loss, logits, ids,
           torch.tensor([[3, 17]]), B)
    raises(ValueError, "block_size must be one of", sampled_softmax_loss, logits, ids, torch.tensor([3, 17]), 5)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,match", [
    (dict(out_features=100), "out_features=100 is not a multiple of block_size 8"),
    (dict(active_blocks=17), "active_blocks must be <= 16"),
    (dict(active_blocks=0), "active_blocks must be a positive integer"),
    (dict(tables=0), "tables must be a positive integer"),
    (dict(bits=21), "bits must be <= 20"),
    (dict(bits=0), "bits must be a positive integer"),
    (dict(block_size=12), "block_size must be one of"),
    (dict(rehash_every=0), "rehash_every must be a positive integer"),
])
def test_constructor_errors(kwargs, match):
    args = dict(in_features=C, out_features=K, block_size=B, active_blocks=4, tables=2, bits=4)
    args.update(kwargs)
    raises(ValueError, match, LSHOutputLayer, **args)


def test_forward_errors():
    layer = _layer(torch.float32)
    x = randn((3, C), torch.float32, 16)
    raises(ValueError, r"x must be \(N, in_features\) = \(N, 16\), got \(3, 15\)", layer, x[:, :15])
    raises(ValueError, r"x must be \(N, in_features\)", layer, x[None])
    raises(TypeError, "use one dtype", layer, x.double())
    raises(ValueError, r"labels must lie in \[0, 128\)", layer, x, torch.tensor([0, 128, 1]))
    raises(ValueError, r"labels must lie in \[0, 128\)", layer, x, torch.tensor([0, -1, 1]))
    for bad in (torch.tensor([0, 1]), torch.tensor([[0, 1, 2]]), torch.tensor([0.0, 1.0, 2.0]),
                torch.tensor([True, False, True]), [0, 1, 2]):
        raises(ValueError, r"labels must be an integer tensor of shape \(N,\) = \(3,\)", layer, x, bad)
    assert int(layer.steps) == 0, "a rejected call must not count as a training step"


def test_reset_parameters_rebuilds_tables():
    layer = _layer(torch.float64)
    layer.choose(randn((2, C), torch.float64, 17))
    before = layer.sorted_ids.clone()
    torch.manual_seed(18)
    layer.reset_parameters()
    layer.choose(randn((2, C), torch.float64, 17))
    _check_tables(layer)
    assert not torch.equal(layer.sorted_ids, before)


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch(mode):
    layer = getattr(_layer(torch.float32), mode)()
    logits, ids = layer(torch.zeros(0, C), torch.zeros(0, dtype=torch.int64))
    assert logits.shape == (0, 4 * B) and ids.shape == (0, 4)


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_non_contiguous_weight(sparse_grad):
    layer = _layer(torch.float64, sparse_grad=sparse_grad)
    layer.weight = torch.nn.Parameter(randn((C, K), torch.float64, 19).t())     # (K, C), strides (1, K)
    x = randn((4, C), torch.float64, 20)
    logits, ids = layer(x)
    assert_close(logits, layer.full_logits(x).gather(1, _columns(ids)), torch.float64, "logits")


def test_choose_checks_labels_and_x():
    layer = _layer(torch.float32)
    x = randn((3, C), torch.float32, 30)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, "):
        layer.choose(x, torch.tensor([0, K, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, "):
        layer.choose(x, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"x must be \(N, in_features\)"):
        layer.choose(x[:, :-1])


def test_16_bit_layers_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        LSHOutputLayer(C, K, block_size=B, active_blocks=4, dtype=torch.bfloat16)
    layer = _layer(torch.float32).to(torch.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        layer(torch.zeros(2, C, dtype=torch.float16))


def test_state_dict_with_one_table_missing_or_misshapen_rebuilds():
    layer, x = _trained()
    layer.rehash()                              # tables of the final weights, which a rebuild reproduces
    state = layer.state_dict()
    partial = {k: v for k, v in state.items() if k != "bucket_ptr"}
    fresh = _layer(torch.float32, seed=2)
    fresh.choose(x)
    fresh.load_state_dict(partial, strict=False)
    assert fresh.sorted_ids.numel() == 0                   # stale tables dropped: rebuilt at the next call
    _same_choice(layer, fresh, x)
    bad = dict(state, bucket_ptr=state["bucket_ptr"][:, :-1])
    with pytest.raises(RuntimeError, match="bucket_ptr has shape"):
        _layer(torch.float32, seed=2).load_state_dict(bad)


def test_sampled_softmax_loss_checks_types():
    logits, ids, labels = torch.zeros(2, 2 * B), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="labels must hold integers"):
        sampled_softmax_loss(logits, ids, labels.float(), B)
    with pytest.raises(TypeError, match="block_ids must be a torch.Tensor"):
        sampled_softmax_loss(logits, ids.tolist(), labels, B)
