"""learn: block sparsity learned during training.

* :class:`HardConcreteGate` - L0 hard-concrete gates (Louizos, Welling & Kingma 2018),
  one per weight block.
* :class:`L0BlockSparseLinear` and :class:`L0BlockSparseConv2d` - block-sparse layers
  whose blocks are scaled by their gates (the conv layer needs ``numbasparse.nn_conv``;
  ``HAVE_CONV`` says whether it is there); :class:`L0BlockSparseLSTM`, an LSTM whose
  recurrent blocks are gated.
* :func:`l0_penalty` - the expected number of live blocks (or FLOPs), or a hinge on the
  expected density for a target-density run.
* :class:`DynamicSparsity` - removes blocks whose gates closed (and optionally regrows
  blocks) during training, so the kernels get faster as the model gets sparser; with
  ``target_density`` it brings the model to that density on a schedule and holds it.
* :class:`GradualPruning` - gradual magnitude pruning (Zhu & Gupta 2017) of any
  block-sparse layer, gated or not, removing pruned blocks from the layouts.

Reaching a target density needs no tuning: one optimizer over all parameters at a
common learning rate, ::

    ctrl = learn.DynamicSparsity(model, optimizer, target_density=0.2)
    ...
    loss = task_loss + learn.l0_penalty(model, target_density=0.2)
    loss.backward(); optimizer.step(); ctrl.step()

reaches density 0.2 by step 1000 (``ramp``) and holds it.
"""
from .dynamic import DynamicSparsity, LayerReport, SparsityReport
from .gates import DEAD_LOG_ALPHA, HardConcreteGate, zero_gate_probability
from .layers import HAVE_CONV, L0BlockSparseConv2d, L0BlockSparseLinear, gate_parameters, gated_layers
from .penalty import block_density, expected_density, l0_penalty
from .pruning import GradualPruning
from .recurrent import L0BlockSparseLSTM
from .schedule import cubic_density
from .slots import block_sparse_layers

__all__ = ["HardConcreteGate", "DEAD_LOG_ALPHA", "zero_gate_probability", "L0BlockSparseLinear",
           "L0BlockSparseConv2d", "L0BlockSparseLSTM", "HAVE_CONV", "gated_layers", "gate_parameters", "l0_penalty",
           "expected_density", "block_density", "DynamicSparsity", "SparsityReport", "LayerReport",
           "GradualPruning", "cubic_density", "block_sparse_layers"]
