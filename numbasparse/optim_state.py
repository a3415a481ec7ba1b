"""Optimizer state of slot-stored weights: gathered on compaction, reset on regrowth,
checked before every optimizer step.

A block-sparse layer stores its weight as ``(capacity, ...)`` slots.  An optimizer's
per-parameter state tensor *follows the slots* when it has the parameter's number of
dimensions, its leading dimension counts slots and every other dimension equals the
parameter's or is 1 (so factored second moments such as Adafactor's row and column
variances follow them too).  Those tensors are what :func:`gather_slots` keeps when
storage shrinks, what :func:`reset_slots` re-initializes for a slot that comes back, and
what :func:`check_optimizer_state` compares with the weight.

The value a revived slot's state gets is what the optimizer gives a fresh parameter:
zero for every state tensor, except Adagrad's ``sum`` (the group's
``initial_accumulator_value``) and Rprop's ``step_size`` (the group's ``lr``).  Other
optimizers whose initial state is not zero declare it with :func:`register_initial_state`.
Scalar state (Adam's ``step``) is shared by all slots of a parameter and is left alone.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .sharding import fill_slots_

__all__ = ["register_initial_state", "initial_state_value", "gather_slots", "reset_slots",
           "check_optimizer_state", "follows_slots", "as_optimizers", "UNCHECKED_OPTIMIZERS"]

_INITIAL: dict = {}
_tracked: dict = {}     # id(param) -> (weakref to the param, description of its owner)
_hook_lock = threading.Lock()
_hook_handle = None


def register_initial_state(optimizer_type: type, name: str, value) -> None:
    """Declare that ``optimizer_type`` (and its subclasses) starts state ``name`` at
    ``value(param_group)`` instead of zero; ``value`` is a callable taking the parameter
    group dict and returning a number."""
    if not (isinstance(optimizer_type, type) and issubclass(optimizer_type, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_type must be a torch.optim.Optimizer subclass, got {optimizer_type!r}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not callable(value):
        raise TypeError(f"value must be a callable taking the parameter group, got {type(value).__name__}")
    _INITIAL[(optimizer_type, name)] = value


register_initial_state(torch.optim.Adagrad, "sum", lambda group: group["initial_accumulator_value"])
register_initial_state(torch.optim.Rprop, "step_size", lambda group: group["lr"])


def initial_state_value(optimizer: torch.optim.Optimizer, group: dict, name: str) -> float:
    """The value ``optimizer`` gives state ``name`` of a fresh parameter of ``group``."""
    for cls in type(optimizer).__mro__:
        value = _INITIAL.get((cls, name))
        if value is not None:
            return float(value(group))
    return 0.0


def follows_slots(value, param: torch.Tensor) -> bool:
    """Whether state tensor ``value`` has one entry per slot of ``param`` along dim 0:
    the parameter's dims with each dim after the first equal or 1 (Adam's moments,
    torch's Adafactor), or fewer dims with the slot count first (factored moments that
    drop a dim, such as ``(slots, B)`` rows of a ``(slots, B, B)`` weight)."""
    if not isinstance(value, torch.Tensor) or param.dim() < 1 or value.dim() < 1:
        return False
    if value.dim() == param.dim():
        return value.shape[0] == param.shape[0] and _slot_shaped(value, param)
    return value.dim() < param.dim() and value.shape[0] == param.shape[0]


def _slot_shaped(value, param) -> bool:
    """Same number of dims, and every dim after the first equal to the parameter's or 1."""
    return (value.dim() == param.dim() >= 1
            and all(v in (p, 1) for v, p in zip(value.shape[1:], param.shape[1:])))


def _group_of(optimizer, param):
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def gather_slots(param: torch.nn.Parameter, index: torch.Tensor, optimizers=()) -> None:
    """Keep only the slots ``index`` (int64 ``(k,)``) of ``param`` - its data, its
    gradient and the slot-following state in each optimizer - in place: ``param`` stays
    the same object, so optimizers and hooks holding it keep working."""
    with torch.no_grad():
        for optimizer in optimizers:
            state = optimizer.state.get(param)
            if state:
                for name, value in state.items():
                    if follows_slots(value, param):
                        state[name] = value[index.to(value.device)].clone()
        grad = param.grad
        param.grad = None
        _set_data(param, param.data[index.to(param.device)].clone())
        if grad is not None:
            param.grad = grad[index.to(grad.device)].clone()


def _set_data(param: torch.nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` for data of another shape.  A graph built before (a ``loss``
    still in scope) keeps the parameter's gradient accumulator alive with the old shape,
    and the next backward would fail on it; torch renews the accumulator when the data's
    dtype changes, so pass through an empty tensor of another dtype first."""
    if param.requires_grad:
        # a graph built before must not run its backward into the resized parameter
        old_accumulator = torch.autograd.graph.get_gradient_edge(param).node
        old_accumulator.register_prehook(_refuse_old_graph)
    other = torch.float32 if data.dtype == torch.float64 else torch.float64
    param.data = data.new_empty(0, dtype=other)
    param.data = data
    # and one that saved the parameter itself fails torch's version check
    torch.autograd.graph.increment_version(param)


def _refuse_old_graph(grad_outputs):
    raise RuntimeError("backward through a graph built before a block-sparse layer's storage was resized "
                       "(compact() or loading a checkpoint of another capacity): its gradients are for the "
                       "old slots.  Run a new forward pass after resizing.")


def resize_slots(param: torch.nn.Parameter, capacity: int) -> None:
    """Give ``param`` ``capacity`` uninitialized slots in place (same object); its
    gradient is dropped.  For loading a checkpoint of another capacity, which then
    overwrites every slot."""
    if param.shape[0] == capacity:
        return
    with torch.no_grad():
        param.grad = None
        _set_data(param, param.data.new_empty((capacity, *param.shape[1:])))


def as_optimizers(optimizer, name: str = "optimizer") -> tuple:
    """``optimizer`` as a tuple of optimizers: None gives ``()``, one
    ``torch.optim.Optimizer`` a 1-tuple, a list or tuple of distinct optimizers (a model
    whose parameter groups are split over several) itself."""
    if optimizer is None:
        return ()
    if isinstance(optimizer, torch.optim.Optimizer):
        return (optimizer,)
    if isinstance(optimizer, (list, tuple)):
        for item in optimizer:
            if not isinstance(item, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, a list or tuple of them, or None; "
                                f"the sequence holds a {type(item).__name__}")
        if len({id(item) for item in optimizer}) != len(optimizer):
            raise ValueError(f"{name}: the same optimizer is listed twice")
        return tuple(optimizer)
    raise TypeError(f"{name} must be a torch.optim.Optimizer, a list or tuple of them, or None; "
                    f"got {type(optimizer).__name__}")


def reset_slots(param: torch.nn.Parameter, index: torch.Tensor, optimizer=None) -> None:
    """Zero the gradient of slots ``index`` of ``param`` and give their state in
    ``optimizer`` (one, a list or tuple of them, or None) the optimizer's initial values
    (see the module docstring)."""
    optimizers = as_optimizers(optimizer)
    with torch.no_grad():
        if param.grad is not None:
            fill_slots_(param.grad, index, 0.0)
        for opt in optimizers:
            state = opt.state.get(param)
            if not state:
                continue
            group = _group_of(opt, param)
            for name, value in state.items():
                if follows_slots(value, param):
                    fill_slots_(value, index, initial_state_value(opt, group, name))


# ------------------------------------------------------------------ shape check
def track(param: torch.nn.Parameter, owner: str) -> None:
    """Check ``param``'s optimizer state against its slot count before every optimizer
    step (the check is installed with the first tracked parameter)."""
    global _hook_handle
    key = id(param)
    _tracked[key] = (weakref.ref(param, lambda _, key=key: _tracked.pop(key, None)), owner)
    if _hook_handle is None:
        with _hook_lock:
            if _hook_handle is None:
                _hook_handle = register_optimizer_step_pre_hook(_before_step)


def _before_step(optimizer, args, kwargs):
    check_optimizer_state(optimizer)


#: Optimizers whose state is not per parameter (L-BFGS keeps flat vectors over all of
#: its parameters under the first one's entry): not checked.
UNCHECKED_OPTIMIZERS = [torch.optim.LBFGS]


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` when ``optimizer`` holds state for a slot-stored weight with
    another number of slots than the weight has (state loaded from a checkpoint that does
    not match the model, or kept across a compaction the optimizer was not given to).

    Runs before every optimizer step once a block-sparse layer exists; optimizers of the
    types in :data:`UNCHECKED_OPTIMIZERS` (append your own) are skipped."""
    if isinstance(optimizer, tuple(UNCHECKED_OPTIMIZERS)):
        return
    state = optimizer.state
    for ref, owner in list(_tracked.values()):
        param = ref()
        if param is None:
            continue
        entries = state.get(param)
        if not entries:
            continue
        for name, value in entries.items():
            if (isinstance(value, torch.Tensor) and _slot_shaped(value, param)
                    and value.shape[0] != param.shape[0]):
                raise ValueError(
                    f"optimizer state {name!r} of a {owner} has {value.shape[0]} slots but the "
                    f"parameter has {param.shape[0]} (shape {tuple(param.shape)}): the optimizer "
                    "state does not belong to this model.  Load the model's state_dict before the "
                    "optimizer's, from the same checkpoint, and pass the optimizer to compact().")
