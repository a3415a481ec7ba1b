"""The expected-L0 penalty of gated block-sparse layers.

For a gated layer with live slots ``S`` the expected number of non-zero blocks is
``sum_{s in S} P(z_s != 0)`` with ``P(z != 0) = sigmoid(log_alpha - beta*log(-gamma/zeta))``
(see :mod:`learn.gates`).  Free (removed) slots do not count and get no gradient.

Two modes:

* plain (``target_density=None``): the sum of expected live blocks over all gated
  layers, each block optionally weighted by its multiply-adds per sample
  (``weighting="flops"``).  Add ``lam * l0_penalty(model)`` to the loss; ``lam`` is the
  price of one block (or one multiply-add) in units of the loss.
* target (``target_density=t``): the hinge ``relu(E[density] - t)`` on the expected
  (block- or FLOP-weighted) density ``E[density] = sum expected live weight / sum weight of
  all block positions``.  Use it at its default strength (weight 1) together with
  ``DynamicSparsity(model, optimizer, target_density=t)``: the controller brings the
  layout to the target on a schedule and holds it there, and the hinge, active while the
  expected density is above the target, pushes the gates of the blocks the task needs
  least down first, so that the controller's ranking (keep probability times relative
  block norm) removes those.  The hinge alone does not reach a target at a common
  learning rate: Adam moves ``log_alpha`` by about ``lr`` per step whatever the weight,
  and a gate needs ~3 units to close.  (It is an exact penalty: for a weight ``lam``
  above the constraint's Lagrange multiplier, minimizing ``loss + lam * hinge`` reaches
  ``E[density] <= t``; with a per-group gate learning rate large enough to move the
  gates, ``lam`` sets how fast.)
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .layers import gated_layers

__all__ = ["l0_penalty", "expected_density", "block_density"]

_WEIGHTINGS = ("blocks", "flops")


def check_target_density(value) -> float | None:
    """``value`` as a float in (0, 1], or None; TypeError/ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"target_density must be a number in (0, 1] or None, got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"target_density must be in (0, 1], got {value}")
    return float(value)


def _layers(model):
    layers = gated_layers(model)
    if not layers:
        raise ValueError("model has no gated layers (learn.L0BlockSparseLinear / L0BlockSparseConv2d)")
    return layers


def _check_weighting(weighting):
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")


def _weight_of(layer, weighting) -> float:
    return 1.0 if weighting == "blocks" else float(layer.block_flops())


def _expected(model, weighting):
    """(expected live weight, total weight) over every gated layer."""
    _check_weighting(weighting)
    expected, total = None, 0.0
    for _, layer in _layers(model):
        w = _weight_of(layer, weighting)
        term = layer.prob_nonzero_live().sum() * w
        expected = term if expected is None else expected + term.to(expected.device)
        total += w * layer.layout.in_blocks * layer.layout.out_blocks
    return expected, total


def expected_density(model: nn.Module, weighting: str = "blocks") -> torch.Tensor:
    """Scalar tensor: expected fraction of block positions (or of multiply-adds with
    ``weighting="flops"``) that are non-zero, over all gated layers; differentiable in
    every ``log_alpha``."""
    expected, total = _expected(model, weighting)
    return expected / total


def block_density(model: nn.Module) -> float:
    """Fraction of block positions that are live in the layouts, over all gated layers."""
    layers = _layers(model)
    live = sum(layer.layout.nnz for _, layer in layers)
    total = sum(layer.layout.in_blocks * layer.layout.out_blocks for _, layer in layers)
    return live / total


def l0_penalty(model: nn.Module, weighting: str = "blocks", target_density: float | None = None) -> torch.Tensor:
    """Expected-L0 penalty of the gated layers of ``model`` (a scalar tensor).

    Args:
        model: a module containing gated layers (a DDP wrapper is fine).
        weighting: ``"blocks"`` (each live block counts 1) or ``"flops"`` (each live block
            counts its multiply-adds per sample, ``layer.block_flops()``: ``B*B`` for a linear
            layer, ``B*B*kh*kw*H_out*W_out`` for a conv layer).
        target_density: None for the plain penalty ``sum_layers sum_live w_block * P(z != 0)``;
            a density ``t`` in (0, 1] for the exact-penalty hinge ``relu(E[density] - t)``,
            to be added to the loss at weight 1 next to a ``DynamicSparsity`` with the same
            ``target_density`` (see the module docstring).

    Raises:
        ValueError: no gated layers, unknown ``weighting``, ``target_density`` outside (0, 1].
    """
    target_density = check_target_density(target_density)
    expected, total = _expected(model, weighting)
    if target_density is None:
        return expected
    return torch.relu(expected / total - target_density)
