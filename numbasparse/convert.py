"""One-call conversion of a dense model: :func:`sparsify` replaces, in place, every
``nn.Linear`` with a :class:`~numbasparse.nn.BlockSparseLinear` and every ``nn.Conv2d``
with a :class:`~numbasparse.nn_conv.BlockSparseConv2d` keeping the weight blocks of
largest norm (``from_dense`` of each class); :class:`SparsifyReport` says what was
converted, what was kept and what was skipped, and why."""
from __future__ import annotations

import fnmatch
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._checks import SUPPORTED_DTYPES, check_block_size
from .nn import BlockSparseLinear
from .nn_conv import BlockSparseConv2d

__all__ = ["sparsify", "SparsifyReport", "LayerReport"]

_KINDS = {nn.Linear: ("linear", BlockSparseLinear), nn.Conv2d: ("conv2d", BlockSparseConv2d)}
_STRING_PADDINGS = ("same", "valid")  # what BlockSparseConv2d takes besides ints and pairs


@dataclass(frozen=True)
class LayerReport:
    """One row of a :class:`SparsifyReport`: a dense ``nn.Linear`` / ``nn.Conv2d`` (or a
    subclass of one) found in the model.

    Attributes:
        name: qualified name as in ``model.named_modules()`` (``""`` for the root).
        kind: ``"linear"`` or ``"conv2d"``.
        shape: ``(in_features, out_features)`` or ``(in_channels, out_channels, kh, kw)``.
        blocks: ``(live, total)`` ``B x B`` blocks of the converted layer; None if skipped.
        reason: why the layer was left dense; None if converted.
    """

    name: str
    kind: str
    shape: tuple
    blocks: tuple | None = None
    reason: str | None = None

    @property
    def converted(self) -> bool:
        return self.reason is None

    @property
    def density(self) -> float | None:
        """Fraction of the blocks kept (live / total); None if skipped."""
        return None if self.blocks is None else self.blocks[0] / self.blocks[1]


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did, one :class:`LayerReport` per layer in
    ``model.named_modules()`` order; ``print(report)`` shows it as a table.

    Attributes:
        block_size: B used for every converted layer.
        rows: list of :class:`LayerReport`.
    """

    block_size: int
    rows: list = field(default_factory=list)

    @property
    def converted(self) -> list:
        """The rows of converted layers."""
        return [row for row in self.rows if row.converted]

    @property
    def skipped(self) -> list:
        """The rows of layers left dense."""
        return [row for row in self.rows if not row.converted]

    def __str__(self) -> str:
        header = ("layer", "kind", "in -> out", "blocks", "density", "note")
        lines = [header]
        for row in self.rows:
            shape = f"{row.shape[0]} -> {row.shape[1]}"
            if row.kind == "conv2d":
                shape += f", {row.shape[2]}x{row.shape[3]}"
            if row.converted:
                lines.append((row.name or "(root)", row.kind, shape, f"{row.blocks[0]}/{row.blocks[1]}",
                              f"{row.density:.3f}", ""))
            else:
                lines.append((row.name or "(root)", row.kind, shape, "-", "-", f"skipped: {row.reason}"))
        widths = [max(len(line[c]) for line in lines) for c in range(len(header) - 1)]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines]
        live = sum(row.blocks[0] for row in self.converted)
        total = sum(row.blocks[1] for row in self.converted)
        kept = f", {live}/{total} blocks kept ({live / total:.3f})" if total else ""
        text.append(f"converted {len(self.converted)} of {len(self.rows)} layers "
                    f"(block_size {self.block_size}){kept}")
        return "\n".join(line.rstrip() for line in text)


# ------------------------------------------------------------------ argument checks
def _check_density(density):
    if density is None:
        return None
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a number in (0, 1] or None, got {type(density).__name__}")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return float(density)


def _check_threshold(threshold):
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a non-negative number or None, got {type(threshold).__name__}")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite non-negative number, got {threshold!r}")
    return float(threshold)


def _check_selector(spec, arg: str):
    """``include`` / ``exclude`` as a predicate ``(names, module) -> bool`` (None for
    None); TypeError naming ``arg`` for anything but a module type, a pattern string, a
    tuple / list of those, or a callable."""
    if spec is None:
        return None
    expected = ("None, an nn.Module subclass, a name pattern string, a tuple or list of those, "
                "or a callable (name, module) -> bool")
    if isinstance(spec, (type, str)):
        items = [spec]
    elif isinstance(spec, (tuple, list)):
        items = list(spec)
    elif callable(spec):
        def predicate(names, module):
            for name in names:
                answer = spec(name, module)
                if not isinstance(answer, (bool, np.bool_)):
                    raise TypeError(f"{arg} must return a bool, got {type(answer).__name__} "
                                    f"for {name or '(root)'!r}")
                if answer:
                    return True
            return False
        return predicate
    else:
        raise TypeError(f"{arg} must be {expected}; got {type(spec).__name__}")
    types, patterns = [], []
    for item in items:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            where = " in it, which is neither an nn.Module subclass nor a string" if item is not spec else ""
            raise TypeError(f"{arg} must be {expected}; got {item!r}{where}")
    types = tuple(types)

    def predicate(names, module):
        return isinstance(module, types) or any(fnmatch.fnmatchcase(name, p) for name in names for p in patterns)
    return predicate


# ------------------------------------------------------------------ the model
def _shape(module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return (module.in_channels, module.out_channels, *module.kernel_size)
    return (module.in_features, module.out_features)


def _kind(module):
    for base, (kind, _) in _KINDS.items():
        if isinstance(module, base):
            return base, kind
    return None, None


def _why_not(module, base, block_size: int, owners: dict) -> str | None:
    """Why ``module`` (an instance of ``base``) cannot be converted, or None
    (``owners`` as :func:`_parameter_owners` gives it)."""
    if type(module) is not base:
        return (f"{type(module).__qualname__}, a subclass of nn.{base.__name__} (its owner may read "
                "the weight directly, as nn.MultiheadAttention does)")
    hooks = [what for what, hook_dict in (("forward pre-hooks", module._forward_pre_hooks),
                                          ("forward hooks", module._forward_hooks),
                                          ("backward hooks", module._backward_hooks),
                                          ("backward pre-hooks", module._backward_pre_hooks))
             if hook_dict]
    if hooks:
        return (f"it has {' and '.join(hooks)} the block-sparse layer would not keep "
                "(weight_norm, spectral_norm and torch.nn.utils.prune work through them)")
    for pname in ("weight", "bias"):
        param = module._parameters.get(pname)
        if pname == "weight" and not isinstance(param, nn.Parameter):
            return "its weight is not a Parameter"
        holders = {} if param is None else owners[id(param)]
        others = [n for mid, ns in holders.items() if mid != id(module) for n in ns]
        if others:
            return f"its {pname} is shared with {', '.join(others)} (tied weights)"
    weight = module.weight
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype}: block-sparse layers hold float32, float64, float16 or bfloat16"
    if weight.is_meta:
        return "its weight is on the meta device (no values to rank the blocks by)"
    if base is nn.Conv2d:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is block-sparse)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is block-sparse)"
        if isinstance(module.padding, str) and module.padding not in _STRING_PADDINGS:
            return f"padding={module.padding!r} (the block-sparse conv takes ints, pairs, 'same' or 'valid')"
    in_size, out_size = _shape(module)[:2]
    what = "channels" if base is nn.Conv2d else "features"
    bad = [f"{side}_{what}={size}" for side, size in (("in", in_size), ("out", out_size)) if size % block_size]
    if bad:
        verb = "are not multiples" if len(bad) > 1 else "is not a multiple"
        return f"{' and '.join(bad)} {verb} of block_size {block_size}"
    return None


def _parameter_owners(model: nn.Module) -> dict:
    """``id(parameter) -> {module id: qualified names}`` over every module holding it
    (reached by any path), to find parameters held by more than one module."""
    owners = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), {}).setdefault(id(module), []).append(
                    f"{mname}.{pname}" if mname else pname)
    return owners


def sparsify(model: nn.Module, density: float | None = None, threshold: float | None = None,
             block_size: int = 32, include=None, exclude=None, return_report: bool = False):
    """Replace, in place, the dense layers of ``model`` by block-sparse ones keeping the
    ``B x B`` weight blocks of largest Frobenius norm.

    Every module of exactly type ``nn.Linear`` becomes
    ``BlockSparseLinear.from_dense(layer, block_size, density=..., threshold=...)`` and
    every module of exactly type ``nn.Conv2d`` becomes
    ``BlockSparseConv2d.from_dense(...)``, wherever it sits (nested modules,
    ``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``; a layer reached by several
    paths is replaced at all of them by one new module).  The new layer is on the old
    one's device, with its dtype, ``training`` flag, ``requires_grad`` flags and bias;
    its weight is stored as blocks (``(capacity, B, B)`` for a linear layer, the
    transpose of ``nn.Linear.weight``; ``(capacity, kh, kw, B, B)`` for a conv, blocks of
    channels at every tap) and its layout goes into ``state_dict`` as extra state, so
    ``sparsify`` of the same dense model with the same arguments builds a model that
    loads the converted model's checkpoint.

    Left dense and reported (see :class:`SparsifyReport`): subclasses of ``nn.Linear`` /
    ``nn.Conv2d`` (their owner may read the weight directly, as
    ``nn.MultiheadAttention`` does with its ``out_proj``), layers whose in / out features
    or channels are not multiples of ``block_size``, convs with ``groups != 1``, a
    ``padding_mode`` other than ``'zeros'``, layers with forward or backward hooks
    (``weight_norm``, ``spectral_norm``, pruning), layers whose weight or bias another
    module shares (tied weights), dtypes other than float32 / float64 / float16 /
    bfloat16, weights on the meta device, and layers left out by ``include`` /
    ``exclude``.  Code that reads a
    converted layer's ``weight`` as a dense matrix (``F.linear(x, layer.weight)``) must
    be excluded by the caller.

    Nothing is changed before every candidate layer has been checked; the layers are
    then converted one at a time, so the extra memory is one layer's.

    Args:
        model: the ``nn.Module`` to convert (itself converted if it is an ``nn.Linear``
            or ``nn.Conv2d``).
        density: fraction in ``(0, 1]`` of each layer's blocks to keep (``round(density *
            total)``, at least one; ``1.0`` keeps every block, so the model computes the
            same function).
        threshold: keep the blocks whose norm is ``>= threshold`` (for a conv, the norm
            over the block and all its taps).  Give ``density`` or ``threshold`` or
            neither: with neither, every block with a non-zero entry is kept (the same
            function again).
        block_size: B in {8, 16, 32}, for every layer.
        include: which layers are candidates (default: all): None, an ``nn.Module``
            subclass (``isinstance`` of the layer), a pattern string matched with
            ``fnmatch`` against the layer's qualified name as in
            ``model.named_modules()`` (``"encoder.*"``, ``"*.fc2"``; ``*`` also matches
            dots), a tuple or list of types and patterns, or a callable
            ``(name, module) -> bool``.
        exclude: layers to leave dense, in the same forms; wins over ``include``.
        return_report: also return the :class:`SparsifyReport`.

    Returns:
        ``model``, or ``(model, report)`` with ``return_report=True``.  When ``model``
        itself is converted the return value is the new module and ``model`` is left
        as it was: use the return value (``model = sparsify(model, ...)``).

    Raises:
        TypeError: ``model`` not an ``nn.Module``; ``density`` / ``threshold`` not a
            number; ``include`` / ``exclude`` of another form, or a callable of them
            returning a non-bool.
        ValueError: ``block_size`` not in {8, 16, 32}; ``density`` not in ``(0, 1]``;
            ``threshold`` negative or not finite; both ``density`` and ``threshold``;
            a candidate layer with NaN or infinite weights (no layer is converted then).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    block_size = check_block_size(block_size)
    density = _check_density(density)
    threshold = _check_threshold(threshold)
    if density is not None and threshold is not None:
        raise ValueError("give density or threshold, not both")
    included = _check_selector(include, "include")
    excluded = _check_selector(exclude, "exclude")

    # every path to every module: a shared layer is matched on all its names and
    # replaced in all its parents
    names, parents = {}, {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for key, child in parent._modules.items():
            if child is not None:
                names.setdefault(id(child), []).append(f"{parent_name}.{key}" if parent_name else key)
                parents.setdefault(id(child), []).append((parent, key))
    names[id(model)] = [""]
    owners = _parameter_owners(model)

    # decide everything (and check the weights) before changing anything
    report = SparsifyReport(block_size)
    plan = []
    for name, module in model.named_modules():
        base, kind = _kind(module)
        if base is None:
            continue
        module_names = names[id(module)]
        if included is not None and not included(module_names, module):
            reason = "not matched by include"
        elif excluded is not None and excluded(module_names, module):
            reason = "matched by exclude"
        else:
            reason = _why_not(module, base, block_size, owners)
        if reason is None and not bool(torch.isfinite(module.weight.detach()).all()):
            raise ValueError(f"cannot sparsify {repr(name) if name else 'the model'}: its weight has NaN or infinite "
                             "entries, so block norms would be meaningless; no layer was converted")
        plan.append((module, name, kind, reason))

    new_model = model
    for index, (module, name, kind, reason) in enumerate(plan):
        if reason is not None:
            report.rows.append(LayerReport(name, kind, _shape(module), reason=reason))
            continue
        new = _convert(module, block_size, density, threshold)
        layout = new.layout
        report.rows.append(LayerReport(name, kind, _shape(module),
                                       blocks=(layout.nnz, layout.in_blocks * layout.out_blocks)))
        if module is model:
            new_model = new
        for parent, key in parents.get(id(module), ()):
            setattr(parent, key, new)
        plan[index] = None  # let the dense layer go as soon as no one else holds it
    return (new_model, report) if return_report else new_model


def _convert(module, block_size, density, threshold):
    """The block-sparse copy of the dense ``module``, with its device, dtype, training
    flag and requires_grad flags."""
    _, cls = _KINDS[type(module)]
    new = cls.from_dense(module, block_size, density=density, threshold=threshold)
    new.to(device=module.weight.device, dtype=module.weight.dtype)
    new.train(module.training)
    new.weight.requires_grad_(module.weight.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    return new
