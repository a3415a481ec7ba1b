"""Adaptive sparsity by hashing: :class:`LSHOutputLayer`, an output layer that computes,
per input row, only the blocks of output neurons that locality-sensitive hashing
expects to score highest; and :func:`sampled_softmax_loss` over what it returns.

Hash family: SimHash (signed random projections).  Its collision probability is
``1 - angle(x, w_k)/pi`` per bit, so a row's buckets hold the neurons whose weight
vectors point most nearly its way: the large logits ``x . w_k`` of a trained output
layer.  It suits the dense real-valued hidden states this layer reads (DWTA, the other
choice of SLIDE, is built for sparse non-negative inputs), and hashing a whole batch
is one small matmul ``x @ planes`` on any device.  Each table votes for the blocks of
the neurons in the row's bucket; the most-voted blocks win (:mod:`.kernels.cpu.lsh`).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._checks import check_block_size
from .kernels.cpu.lsh import build_tables, choose_blocks
from .sampled import _Groups, _SampledMatmul, check_active, sampled_backward, sampled_forward

__all__ = ["LSHOutputLayer", "sampled_softmax_loss"]


def _positive(value, name, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


class LSHOutputLayer(nn.Module):
    """``logits = x @ weight.T + bias`` computed only for a few output blocks per row,
    chosen by SimHash tables over the output neurons' weight vectors.

    Args:
        in_features: C, features of ``x``.
        out_features: K, output neurons (a vocabulary), a multiple of ``block_size``.
        block_size: B in {8, 16, 32}: neurons are chosen in blocks of B.
        active_blocks: A, blocks computed per row (``A*B`` logits).
        tables: L, hash tables (more tables: better recall, more votes to count).
        bits: bits per table code (more bits: smaller buckets, fewer votes).
        rehash_every: training forward calls between rebuilds of the tables from the
            current weights (the weights drift as they train).
        bias: learn a bias ``(out_features,)``.
        seed: seed of the hyperplanes and of the random fill of the choice (None: 0, so
            layers built alike hash alike; the weights come from torch's generator).

    Attributes:
        weight: ``(out_features, in_features)`` (``nn.Linear``'s orientation), bias ``(out_features,)``.
        planes: ``(in_features, tables*bits)`` hyperplanes; ``steps``: training calls so
            far; ``sorted_ids``, ``bucket_ptr``: the tables (buffers, all saved in
            ``state_dict`` with the generator of the random fill, so a checkpoint resumes
            with the same tables and choices; a state dict without the tables makes the
            layer rebuild them from the loaded weights).  The tables follow the weights
            only at a rehash: after changing the weights by hand, call :meth:`rehash`.

    Forward: ``forward(x (N, C), labels=None) -> (logits (N, A*B), block_ids (N, A))``;
    ``logits[n, k*B + j]`` is neuron ``block_ids[n, k]*B + j``.  In training mode every
    row's label block (``labels (N,)`` neuron ids) is among its blocks.  Gradients reach
    only the chosen blocks' weights and biases; with ``sparse_grad=True`` they are sparse
    COO tensors (rows of ``weight``), for ``torch.optim.SparseAdam`` or ``SGD``, which
    then update only those rows.  :meth:`full_logits` computes every logit.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 32, active_blocks: int = 32,
                 tables: int = 16, bits: int = 10, rehash_every: int = 50, bias: bool = True,
                 sparse_grad: bool = False, seed: int | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features = _positive(in_features, "in_features")
        self.out_features = _positive(out_features, "out_features")
        self.block_size = check_block_size(block_size)
        if out_features % self.block_size:
            raise ValueError(f"out_features={out_features} is not a multiple of block_size {self.block_size}")
        self.n_blocks = out_features // self.block_size
        self.active_blocks = _positive(active_blocks, "active_blocks", self.n_blocks)
        self.tables = _positive(tables, "tables")
        self.bits = _positive(bits, "bits", 20)
        self.rehash_every = _positive(rehash_every, "rehash_every")
        self.sparse_grad = bool(sparse_grad)
        factory = {"device": device, "dtype": dtype}
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"LSHOutputLayer computes in float32 or float64, got dtype={dtype}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self._choice_seeds = gen
        self._gradient_buffer = _GradientBuffer()
        self.register_buffer("planes", torch.randn(in_features, self.tables * self.bits, generator=gen).to(**factory))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("sorted_ids", torch.zeros((0,), dtype=torch.int32))
        self.register_buffer("bucket_ptr", torch.zeros((0,), dtype=torch.int32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As ``nn.Linear``: uniform in +-1/sqrt(in_features); the tables are rebuilt."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
        self.sorted_ids = self.sorted_ids.new_zeros((0,))

    # ------------------------------------------------------------ hashing
    def _codes(self, vectors: torch.Tensor) -> np.ndarray:
        """``(M, L)`` int64 SimHash codes of ``vectors (M, C)``."""
        signs = (vectors.detach() @ self.planes.to(vectors.dtype)) > 0
        signs = signs.view(-1, self.tables, self.bits).cpu().numpy()
        weights = (1 << np.arange(self.bits, dtype=np.int64))
        return (signs * weights).sum(axis=2)

    def rehash(self) -> None:
        """Rebuild the tables from the current weights."""
        sorted_ids, bucket_ptr = build_tables(self._codes(self.weight), self.bits)
        device = self.weight.device
        self.sorted_ids = torch.from_numpy(sorted_ids).to(device)
        self.bucket_ptr = torch.from_numpy(bucket_ptr).to(device)

    def choose(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, A)`` int64 block ids for the rows of ``x`` (label blocks included when given)."""
        self._check_input(x, labels)
        return self._choose(x, labels)

    def _choose(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.sorted_ids.numel() == 0:
            self.rehash()
        queries = self._codes(x)
        label_ids = np.full(x.shape[0], -1, dtype=np.int64) if labels is None else \
            labels.detach().to("cpu", torch.int64).numpy()
        out = np.empty((x.shape[0], self.active_blocks), dtype=np.int64)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=self._choice_seeds))
        choose_blocks(queries, self.sorted_ids.cpu().numpy(), self.bucket_ptr.cpu().numpy(), self.block_size,
                      self.n_blocks, label_ids, seed, out)
        return torch.from_numpy(out).to(x.device)

    # ------------------------------------------------------------ forward
    def _check_input(self, x, labels=None):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, in_features) = (N, {self.in_features}), got {shape}")
        if self.weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"LSHOutputLayer computes in float32 or float64, but its weight is {self.weight.dtype}")
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the layer is {self.weight.dtype} on "
                            f"{self.weight.device}: use one dtype and device")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],) \
                    or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor of shape (N,) = ({x.shape[0]},)")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.out_features):
                raise ValueError(f"labels must lie in [0, {self.out_features}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self._check_input(x, labels)
        if self.training and torch.is_grad_enabled():
            if int(self.steps) % self.rehash_every == 0:
                self.rehash()
            self.steps += 1
        block_ids = self._choose(x, labels if self.training else None)
        return self._logits(x, block_ids), block_ids

    def logits_of(self, x: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``(N, A*B)`` logits of the blocks ``block_ids (N, A)`` of every row."""
        self._check_input(x)
        return self._logits(x, check_active(block_ids, x.shape[0], self.n_blocks, x.device))

    def _logits(self, x: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        groups = _Groups(block_ids)
        x, weight = x.contiguous(), self.weight.contiguous()
        if self.sparse_grad:
            y = _SparseRows.apply(x, weight, groups, self.block_size, self._gradient_buffer)
        else:
            y = _SampledMatmul.apply(x, weight.t(), groups, "cols", self.block_size)
        if self.bias is not None:
            if self.sparse_grad:
                y = y + _SparseBias.apply(self.bias, block_ids, groups, self.block_size)
            else:
                y = y + self.bias.view(self.n_blocks, self.block_size)[block_ids]
        return y.reshape(x.shape[0], block_ids.shape[1] * self.block_size)

    def full_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, out_features)``: every logit (for exact evaluation)."""
        self._check_input(x)
        return nn.functional.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def recall(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """How often the hashed choice (without labels) contains the block of the highest
        logit (``"top_block"``) and, given ``labels``, the label's block (``"label_block"``);
        ``"chance"``: A / number of blocks."""
        chosen = self.choose(x)
        top = self.full_logits(x).argmax(1) // self.block_size
        result = {"top_block": (chosen == top[:, None]).any(1).float().mean().item(),
                  "chance": self.active_blocks / self.n_blocks}
        if labels is not None:
            result["label_block"] = (chosen == (labels.to(chosen.device) // self.block_size)[:, None]).any(1) \
                .float().mean().item()
        return result

    # ------------------------------------------------------------ checkpoints
    def get_extra_state(self):
        """The generator of the random fill, so that a checkpoint resumes the same choices."""
        return {"choice_rng": self._choice_seeds.get_state()}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("choice_rng"), torch.Tensor):
            raise ValueError("the LSHOutputLayer extra state must be a dict with the tensor 'choice_rng'")
        self._choice_seeds.set_state(state["choice_rng"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("sorted_ids", "bucket_ptr"):     # the tables' shapes depend on the layer's settings
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, torch.Tensor):
                setattr(self, name, torch.empty_like(incoming, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        loaded = [isinstance(state_dict.get(prefix + name), torch.Tensor) for name in ("sorted_ids", "bucket_ptr")]
        expected = {"sorted_ids": (self.tables, self.out_features), "bucket_ptr": (self.tables, (1 << self.bits) + 1)}
        wrong = [f"{prefix}{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}"
                 for name, shape in expected.items() if getattr(self, name).numel()
                 and tuple(getattr(self, name).shape) != shape]
        if not all(loaded) or wrong:
            error_msgs.extend(wrong)
            self.sorted_ids = self.sorted_ids.new_zeros((0,))   # rebuilt from the loaded weights at the next call

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"active_blocks={self.active_blocks}, tables={self.tables}, bits={self.bits}, "
                f"rehash_every={self.rehash_every}, sparse_grad={self.sparse_grad}")


class _GradientBuffer:
    """A reusable tensor for the values of the sparse weight gradient.

    Those values are about as large as the weight itself (every chosen block's rows);
    a fresh tensor of that size costs a page fault per 4 KiB on every step (13 ms of a
    20 ms step at vocabulary 32768).  The buffer is handed out again only when nothing
    else holds its storage any more (the previous gradient was consumed and released,
    e.g. by ``zero_grad(set_to_none=True)``); otherwise a new one is made."""

    def __init__(self):
        self._tensor = None

    def get(self, shape, like: torch.Tensor) -> torch.Tensor:
        held = self._tensor
        if held is not None and held.dtype == like.dtype and held.device == like.device \
                and held.numel() >= math.prod(shape) and self._only_ours(held):
            return held[:math.prod(shape)].view(shape)
        self._tensor = like.new_empty((math.prod(shape),))
        return self._tensor.view(shape)

    @staticmethod
    def _only_ours(tensor: torch.Tensor) -> bool:
        use_count = getattr(torch._C, "_storage_Use_Count", None)
        if use_count is None:
            return False
        storage = tensor.untyped_storage()
        return use_count(storage._cdata) <= 2      # this tensor and the storage object just made


class _SparseRows(torch.autograd.Function):
    """Sampled logits of ``weight (K, C)``'s chosen blocks, with a sparse COO gradient:
    the rows of the chosen blocks only."""

    @staticmethod
    def forward(ctx, x, weight, groups, block, buffer):
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.block, ctx.buffer = groups, block, buffer
        return sampled_forward(x, weight, "cols", groups, block)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        groups, block = ctx.groups, ctx.block
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, values = sampled_backward(x, dy.contiguous(), weight, "cols", groups, block, need_dx, need_dw,
                                      compact=True, out=ctx.buffer)
        dw = None
        if need_dw:
            rows = (torch.from_numpy(groups.group_block)[:, None] * block + torch.arange(block)).reshape(1, -1)
            dw = torch.sparse_coo_tensor(rows.to(weight.device), values, weight.shape, is_coalesced=True,
                                         check_invariants=False)
        return dx, dw, None, None, None


class _SparseBias(torch.autograd.Function):
    """``bias`` gathered at the chosen blocks ``(N, A, B)``, with a sparse COO gradient."""

    @staticmethod
    def forward(ctx, bias, block_ids, groups, block):
        ctx.groups, ctx.block, ctx.size = groups, block, bias.shape[0]
        ctx.block_ids = block_ids
        return bias.view(-1, block)[block_ids]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        groups, block = ctx.groups, ctx.block
        unique = torch.from_numpy(groups.group_block).to(dy.device)
        flat = dy.reshape(-1, block)
        if flat.device.type == "cpu":       # the pairs are sorted by block: one sum per run of pairs
            values = torch.from_numpy(np.add.reduceat(flat.numpy()[groups.pairs], groups.group_ptr[:-1], axis=0)) \
                if unique.numel() else flat.new_zeros((0, block))
        else:
            where = torch.searchsorted(unique, ctx.block_ids.reshape(-1))
            values = flat.new_zeros((unique.shape[0], block)).index_add_(0, where, flat)
        rows = (unique[:, None] * block + torch.arange(block, device=dy.device)).reshape(1, -1)
        grad = torch.sparse_coo_tensor(rows, values.reshape(-1), (ctx.size,), is_coalesced=True,
                                       check_invariants=False)
        return grad, None, None, None


def sampled_softmax_loss(logits: torch.Tensor, block_ids: torch.Tensor, labels: torch.Tensor, block_size: int,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``labels`` over the sampled logits of :class:`LSHOutputLayer`:
    the softmax runs over each row's ``A*B`` computed logits (the label's block must be
    among ``block_ids``, as it is in training mode).  ``reduction``: "mean", "sum" or "none"."""
    block = check_block_size(block_size)
    for name, t in (("logits", logits), ("block_ids", block_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("block_ids", block_ids), ("labels", labels)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    if logits.dim() != 2 or block_ids.dim() != 2 or logits.shape != (block_ids.shape[0], block_ids.shape[1] * block):
        raise ValueError(f"logits must be (N, A*B) for block_ids (N, A) and B={block}, got {tuple(logits.shape)} "
                         f"and {tuple(block_ids.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape (N,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
    hit = block_ids == (labels // block)[:, None]
    if not bool(hit.any(1).all()):
        missing = int((~hit.any(1)).nonzero()[0, 0])
        raise ValueError(f"row {missing}'s label {int(labels[missing])} is not in its blocks: call the layer "
                         "in training mode with labels, or score with full_logits")
    position = hit.int().argmax(1) * block + labels % block
    return nn.functional.cross_entropy(logits, position, reduction=reduction)
