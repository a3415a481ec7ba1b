"""SimHash tables over output neurons and the per-row choice of output blocks (numba).

Tables (``L`` tables of ``bits``-bit codes over ``K`` neurons)::

    codes      (K, L)          int64 code of neuron k in table t
    sorted_ids (L, K)          int32 neurons of table t sorted by code (stable)
    bucket_ptr (L, 2**bits+1)  int32 neurons with code c in table t are
                               sorted_ids[t, bucket_ptr[t, c]:bucket_ptr[t, c+1]]

A query row with codes ``q (L,)`` votes once per table for the block (``k // B``) of
every neuron sharing its bucket; the row's ``A`` blocks are the most voted (ties: the
one voted for first, in table order), then, if fewer than ``A`` blocks got a vote, random other blocks; a label
block that is not among them replaces the last.  One thread per call (the work is a
few hundred votes per row).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["build_tables", "choose_blocks"]


def build_tables(codes: np.ndarray, bits: int):
    """``(sorted_ids, bucket_ptr)`` of ``codes (K, L)`` (see the module docstring)."""
    n_neurons, n_tables = codes.shape
    sorted_ids = np.argsort(codes.T, axis=1, kind="stable").astype(np.int32)
    bucket_ptr = np.zeros((n_tables, (1 << bits) + 1), dtype=np.int32)
    for t in range(n_tables):
        counts = np.bincount(codes[:, t], minlength=1 << bits)
        bucket_ptr[t, 1:] = np.cumsum(counts)
    return sorted_ids, bucket_ptr


@njit(cache=True)
def choose_blocks(queries, sorted_ids, bucket_ptr, block, n_blocks, labels, seed, out):
    """``out (N, A)`` int64: the blocks of each row (module docstring); ``labels (N,)``
    int64 neuron ids to include, or -1 for none; ``seed`` drives the random fill."""
    np.random.seed(seed)
    n_rows, n_active = out.shape
    n_tables = queries.shape[1]
    votes = np.zeros(n_blocks, dtype=np.int64)
    touched = np.empty(n_blocks, dtype=np.int64)
    taken = np.zeros(n_blocks, dtype=np.bool_)
    ranked = np.empty(n_blocks, dtype=np.int64)
    max_votes = n_tables * block
    level_start = np.zeros(max_votes + 1, dtype=np.int64)
    for n in range(n_rows):
        n_touched = 0
        for t in range(n_tables):
            code = queries[n, t]
            for q in range(bucket_ptr[t, code], bucket_ptr[t, code + 1]):
                b = sorted_ids[t, q] // block
                if votes[b] == 0:
                    touched[n_touched] = b
                    n_touched += 1
                votes[b] += 1
        # most votes first (ties: first voted first): a counting sort over the vote counts
        level_start[:] = 0
        for i in range(n_touched):
            level_start[votes[touched[i]]] += 1
        position = 0
        for v in range(max_votes, 0, -1):
            count = level_start[v]
            level_start[v] = position
            position += count
        for i in range(n_touched):
            v = votes[touched[i]]
            ranked[level_start[v]] = touched[i]
            level_start[v] += 1
        chosen = min(n_active, n_touched)
        for i in range(chosen):
            b = ranked[i]
            out[n, i] = b
            taken[b] = True
        while chosen < n_active:            # fewer voted blocks than asked for: random others
            b = np.random.randint(0, n_blocks)
            if not taken[b]:
                taken[b] = True
                out[n, chosen] = b
                chosen += 1
        if labels[n] >= 0:
            label_block = labels[n] // block
            if not taken[label_block]:
                taken[out[n, n_active - 1]] = False
                out[n, n_active - 1] = label_block
                taken[label_block] = True
        for i in range(n_touched):
            votes[touched[i]] = 0
        for i in range(n_active):
            taken[out[n, i]] = False
