"""Slot storage of block-sparse layers: the :class:`BlockStorage` mixin.

A layer with block storage holds ``weight`` of shape ``(capacity, ...)``: slot ``s`` is
the block of the live layout entry stored there, free slots hold nothing the kernels
read.  The mixin gives such a layer layout swaps, in-place compaction, and checkpoints
that carry the layout (extra state of tensors and ints, so they load with
``torch.load(..., weights_only=True)``) and load in the standard PyTorch order: build
the model and its optimizer, then load both.  Loading a checkpoint of another capacity
(saved after :meth:`BlockStorage.compact`) resizes the Parameters in place, so an
optimizer built before the load keeps training them.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import as_layout
from ._interrupts import deferred_interrupts
from .layout import BlockLayout
from .layout_tensor import layout_tensor
from .optim_state import as_optimizers, gather_slots, resize_slots, track
from .sharding import is_sharded

__all__ = ["BlockStorage", "layout_extra_state", "layout_from_extra_state"]


def layout_extra_state(layout: BlockLayout, block_size: int) -> dict:
    """A layer's layout as ``state_dict`` extra state (tensors and ints only)."""
    return {"mask": torch.from_numpy(layout.mask), "slots": torch.from_numpy(layout.slots),
            "capacity": layout.capacity, "block_size": block_size}


def layout_from_extra_state(state: dict, current: BlockLayout, block_size: int) -> BlockLayout:
    """Inverse of :func:`layout_extra_state`, checked against the layer's current layout
    (same block size and shape); ``ValueError`` naming the mismatch otherwise."""
    if not isinstance(state, dict) or not {"mask", "slots", "capacity", "block_size"} <= state.keys():
        raise ValueError("the layout state must be a dict with mask, slots, capacity and block_size, got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    if int(state["block_size"]) != block_size:
        raise ValueError(f"the checkpoint has block_size {state['block_size']}, the module has {block_size}")
    try:
        layout = BlockLayout(torch.as_tensor(state["mask"]).cpu().numpy(),
                             torch.as_tensor(state["slots"]).cpu().numpy(), int(state["capacity"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the checkpoint's layout is invalid: {err}") from None
    if layout.shape != current.shape:
        raise ValueError(f"the checkpoint's layout has shape {layout.shape}, the module's {current.shape}")
    return layout


class BlockStorage:
    """Mixin for ``nn.Module`` layers whose ``weight`` is ``(capacity, ...)`` blocks
    stored in the slots of ``self.layout`` (see the module docstring).

    Subclasses with more per-slot Parameters (gates) extend :meth:`_slot_parameters`,
    :meth:`_storage_resized` and :meth:`_check_checkpoint`.
    """

    block_size: int
    weight: nn.Parameter

    # ------------------------------------------------------------ layout
    @property
    def layout(self) -> BlockLayout:
        """The current :class:`BlockLayout` (assigning one also refreshes the buffer
        ``kernel_layout``, the layout as the ops take it, on the weight's device)."""
        return self._layout

    @layout.setter
    def layout(self, layout: BlockLayout) -> None:
        self._layout = layout
        self._refresh_kernel_tensors()

    def _refresh_kernel_tensors(self) -> None:
        """Buffers the forward pass hands the ops, made from the layout (not saved in
        ``state_dict``: the layout is, as extra state)."""
        weight = self._parameters.get("weight")
        device = weight.device if weight is not None else torch.device("cpu")
        self.register_buffer("kernel_layout", layout_tensor(self._layout, device), persistent=False)

    # ------------------------------------------------------------ slot parameters
    def _slot_parameter_names(self) -> list:
        """Names (as in ``state_dict``) of the parameters with one entry per slot along dim 0."""
        return ["weight"]

    def _slot_parameters(self) -> list:
        return [self.get_parameter(name) for name in self._slot_parameter_names()]

    def _storage_resized(self) -> None:
        """Called after the slot Parameters changed capacity."""

    def _track_storage(self) -> None:
        track(self.weight, f"{type(self).__name__} weight")

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), to_empty() may replace the Parameter objects, and to_empty()
        # leaves the buffers uninitialized
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_kernel_tensors()
        self._track_storage()
        return out

    # ------------------------------------------------------------ layout editing
    def set_layout(self, layout: BlockLayout) -> None:
        """Swap in a layout of the same shape and capacity (weights stay in their slots)."""
        layout = as_layout(layout)
        if layout.shape != self.layout.shape:
            raise ValueError(f"layout shape {layout.shape} != {self.layout.shape}")
        if layout.capacity != self.weight.shape[0]:
            raise ValueError(f"layout capacity {layout.capacity} != weight storage {self.weight.shape[0]}")
        self.layout = layout

    def compact(self, optimizer=None):
        """Shrink storage to the live blocks, renumbered 0..nnz-1 in row-major order.

        In place: the Parameters stay the same objects (hooks, wrappers and optimizers
        holding them stay valid).  The per-slot state of ``optimizer`` (a
        ``torch.optim.Optimizer``, a list or tuple of them, or None) and the gradients are
        gathered along; any other optimizer with state for this layer raises a
        ``ValueError`` at its next step.  Returns the layer.
        """
        optimizers = as_optimizers(optimizer)
        if is_sharded(self.weight):
            raise RuntimeError(f"compact() on a {type(self).__name__} whose parameters FSDP shards: compact "
                               "before fully_shard(), or save a checkpoint, compact an unsharded model and shard it")
        slots = self.layout.index_tensor("entry_slots", self.weight.device)
        with deferred_interrupts():
            for param in self._slot_parameters():
                gather_slots(param, slots, optimizers)
            self.layout = self.layout.compacted()
            self._storage_resized()
        return self

    # ------------------------------------------------------------ checkpoints
    def get_extra_state(self):
        return layout_extra_state(self.layout, self.block_size)

    def set_extra_state(self, state):
        self.layout = layout_from_extra_state(state, self.layout, self.block_size)

    def _load_slot_children(self, state_dict: dict, prefix: str) -> None:
        """Load the per-slot state of child modules (gates) together with the weight, so
        that an interrupt before torch reaches the children cannot leave them resized
        but empty (torch then loads them again, to the same values)."""

    def _check_checkpoint(self, state_dict: dict, prefix: str, layout: BlockLayout,
                          whose: str = "the checkpoint's") -> str | None:
        """What makes the checkpoint entries under ``prefix`` (this layer's and its
        children's) inconsistent with the checkpoint's ``layout`` or with this layer, or
        None.  Slot parameters must have ``layout.capacity`` slots, every other tensor
        the shape it has here."""
        slot_names = set(self._slot_parameter_names())
        weight = state_dict.get(prefix + "weight")
        if weight is None and layout.capacity != self.weight.shape[0]:
            return (f"the checkpoint has a layout of capacity {layout.capacity} but no {prefix}weight "
                    f"(the module's weight has {self.weight.shape[0]} slots)")
        for name, current in self.state_dict(keep_vars=True).items():
            incoming = state_dict.get(prefix + name)
            if incoming is None or not isinstance(current, torch.Tensor):
                continue
            if not isinstance(incoming, torch.Tensor):
                return f"{prefix}{name} is a {type(incoming).__name__}, not a tensor"
            expected = (layout.capacity, *current.shape[1:]) if name in slot_names else tuple(current.shape)
            if tuple(incoming.shape) != expected:
                why = (f"{whose} layout has capacity {layout.capacity}" if name in slot_names
                       else "the module's is")
                return f"{prefix}{name} has shape {tuple(incoming.shape)} but {why} {expected}"
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        try:
            layout = self.layout if extra is None else layout_from_extra_state(extra, self.layout, self.block_size)
            problem = self._check_checkpoint(state_dict, prefix, layout,
                                             "the layer's" if extra is None else "the checkpoint's")
        except ValueError as err:
            problem = str(err)
        if problem is not None:
            error_msgs.append(f"{type(self).__name__} at {prefix[:-1] or 'the top level'!r}: {problem}; "
                              "the layer was left as it was")
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]  # its children (gates) stay as they are too
            return
        with deferred_interrupts():  # storage resized and filled, or left as it was
            if extra is not None and layout.capacity != self.weight.shape[0]:
                for param in self._slot_parameters():
                    resize_slots(param, layout.capacity)
                self._storage_resized()
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if extra is not None:
                self._load_slot_children(state_dict, prefix)
        self._track_storage()
