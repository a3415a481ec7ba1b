"""Generators of block layouts.

Every generator returns a :class:`~numbasparse.layout.BlockLayout` of shape
``(in_blocks, out_blocks)``; the same arguments (and seed) give the same layout.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .layout import BlockLayout

__all__ = ["random", "dense", "block_diagonal", "watts_strogatz", "barabasi_albert", "from_dense", "lstm_gates"]


def _count(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


def random(in_blocks: int, out_blocks: int, density: float, seed: int | None = None) -> BlockLayout:
    """Uniformly random layout with exactly ``round(density * in_blocks * out_blocks)`` live blocks."""
    in_blocks = _count(in_blocks, "in_blocks")
    out_blocks = _count(out_blocks, "out_blocks")
    density = _fraction(density, "density")
    total = in_blocks * out_blocks
    nnz = int(round(density * total))
    rng = np.random.default_rng(_seed(seed))
    mask = np.zeros(total, dtype=bool)
    mask[rng.choice(total, size=nnz, replace=False)] = True
    return BlockLayout(mask.reshape(in_blocks, out_blocks))


def dense(in_blocks: int, out_blocks: int | None = None) -> BlockLayout:
    """Every block live."""
    in_blocks = _count(in_blocks, "in_blocks")
    out_blocks = in_blocks if out_blocks is None else _count(out_blocks, "out_blocks")
    return BlockLayout(np.ones((in_blocks, out_blocks), dtype=bool))


def block_diagonal(in_blocks: int, out_blocks: int | None = None, groups: int | None = None) -> BlockLayout:
    """Rows and columns split into ``groups`` contiguous ranges; range g of the rows feeds
    range g of the columns.  Default ``groups = min(in_blocks, out_blocks)`` (the diagonal)."""
    in_blocks = _count(in_blocks, "in_blocks")
    out_blocks = in_blocks if out_blocks is None else _count(out_blocks, "out_blocks")
    groups = min(in_blocks, out_blocks) if groups is None else _count(groups, "groups")
    if groups > min(in_blocks, out_blocks):
        raise ValueError(f"groups must be <= min(in_blocks, out_blocks) = {min(in_blocks, out_blocks)}, got {groups}")
    row_group = np.arange(in_blocks) * groups // in_blocks
    col_group = np.arange(out_blocks) * groups // out_blocks
    return BlockLayout(row_group[:, None] == col_group[None, :])


def _graph_layout(graph, n):
    mask = np.zeros((n, n), dtype=bool)
    for a, b in graph.edges():
        mask[a, b] = mask[b, a] = True
    np.fill_diagonal(mask, True)  # self-connections keep every block row and column live
    return BlockLayout(mask)


def watts_strogatz(n: int, k: int, p: float, seed: int | None = None) -> BlockLayout:
    """Square small-world layout: a Watts-Strogatz graph on ``n`` block nodes (ring of ``k``
    nearest neighbours, each edge rewired with probability ``p``) plus self-connections."""
    import networkx as nx

    n = _count(n, "n")
    k = _count(k, "k", minimum=0)
    if k >= n:
        raise ValueError(f"k must be < n, got k={k}, n={n}")
    p = _fraction(p, "p")
    return _graph_layout(nx.watts_strogatz_graph(n, k, p, seed=_seed(seed)), n)


def barabasi_albert(n: int, m: int, seed: int | None = None) -> BlockLayout:
    """Square scale-free layout: a Barabasi-Albert graph on ``n`` block nodes, each new node
    attaching to ``m`` existing ones, plus self-connections."""
    import networkx as nx

    n = _count(n, "n")
    m = _count(m, "m")
    if m >= n:
        raise ValueError(f"m must be < n, got m={m}, n={n}")
    return _graph_layout(nx.barabasi_albert_graph(n, m, seed=_seed(seed)), n)


def lstm_gates(hidden_layout, gates: int = 4) -> BlockLayout:
    """The fused recurrent layout ``(n, gates*n)`` of an LSTM from a layout over its
    hidden blocks ``(n, n)``: block ``(i, j)`` of ``hidden_layout`` connects hidden block
    ``i`` to hidden block ``j`` through every gate (columns ``j``, ``n+j``, ``2n+j``...).

    ``lstm_gates(watts_strogatz(n, k, p))`` is the small-world LSTM layout: each hidden
    block reads itself, its ``k`` ring neighbours and a few rewired long-range blocks.
    """
    if not isinstance(hidden_layout, BlockLayout):
        hidden_layout = BlockLayout(hidden_layout)
    gates = _count(gates, "gates")
    if hidden_layout.in_blocks != hidden_layout.out_blocks:
        raise ValueError(f"hidden_layout must be square (hidden blocks, hidden blocks), got {hidden_layout.shape}")
    return BlockLayout(np.tile(hidden_layout.mask, (1, gates)))


def block_norms(weight, block_size: int) -> np.ndarray:
    """Frobenius norm of each ``block_size`` x ``block_size`` block of a 2-D weight
    ``(in_features, out_features)``; returns ``(in_blocks, out_blocks)`` float64."""
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().double().numpy()
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (in_features, out_features), got shape {weight.shape}")
    block_size = _count(block_size, "block_size")
    if not np.all(np.isfinite(weight)):
        bad = np.argwhere(~np.isfinite(weight))
        raise ValueError(f"weight has {len(bad)} non-finite entries (NaN or inf), the first at {tuple(int(i) for i in bad[0])}: "
                         "block norms would be meaningless")
    rows, cols = weight.shape
    if rows % block_size or cols % block_size:
        raise ValueError(f"weight shape {weight.shape} is not divisible by block_size {block_size}")
    blocks = weight.reshape(rows // block_size, block_size, cols // block_size, block_size)
    return np.sqrt(np.einsum("ibjc,ibjc->ij", blocks, blocks))


def from_dense(weight, block_size: int, density: float | None = None, threshold: float | None = None) -> BlockLayout:
    """Layout keeping the blocks of largest Frobenius norm of ``weight`` (in_features, out_features).

    Give ``density`` (keep ``round(density * total)`` blocks, at least one when
    density > 0; ties broken by position) or ``threshold`` (keep blocks whose norm is
    >= threshold).  With neither, every block with a non-zero entry is kept.
    """
    norms = block_norms(weight, block_size)
    if density is not None and threshold is not None:
        raise ValueError("give density or threshold, not both")
    if density is not None:
        density = _fraction(density, "density")
        keep = int(round(density * norms.size))
        if density > 0:
            keep = max(keep, 1)
        order = np.argsort(-norms.ravel(), kind="stable")
        mask = np.zeros(norms.size, dtype=bool)
        mask[order[:keep]] = True
        return BlockLayout(mask.reshape(norms.shape))
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite non-negative number, got {threshold!r}")
        return BlockLayout(norms >= threshold)
    return BlockLayout(norms > 0)
