"""Argument validation shared by the functional API: clear errors, never a numba traceback."""
from __future__ import annotations

import operator

import torch

from .layout import BlockLayout

SUPPORTED_BLOCK_SIZES = (8, 16, 32)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_NAMES = "float32, float64, float16 and bfloat16"


def as_layout(layout) -> BlockLayout:
    """Accept a BlockLayout or anything BlockLayout() accepts (a 2-D 0/1 mask)."""
    return layout if isinstance(layout, BlockLayout) else BlockLayout(layout)


def check_block_size(block_size) -> int:
    """The block size as a plain int, or ValueError."""
    if not isinstance(block_size, bool):
        try:
            value = operator.index(block_size)
        except TypeError:
            value = None
        if value in SUPPORTED_BLOCK_SIZES:
            return value
    raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")


def block_size_of(block_size, w: torch.Tensor) -> int:
    if block_size is None:
        if w.dim() != 3 or w.shape[-1] != w.shape[-2]:
            raise ValueError(f"w must have shape (nnz, B, B), got {tuple(w.shape)}")
        block_size = w.shape[-1]
    return check_block_size(block_size)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {DTYPE_NAMES}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_same_placement(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but w is on {w.device}: move both to one device")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype} but w has dtype {w.dtype}: use one dtype")


def check_weight_shape(w: torch.Tensor, layout: BlockLayout, block_size: int) -> None:
    expected = (layout.capacity, block_size, block_size)
    if tuple(w.shape) != expected:
        raise ValueError(f"w must have shape (nnz, B, B) = {expected} for this layout "
                         f"(capacity {layout.capacity}, block_size {block_size}), got {tuple(w.shape)}")


def check_features(name: str, size: int, blocks: int, block_size: int, what: str) -> None:
    if size != blocks * block_size:
        raise ValueError(f"{name} has {size} features but the layout has {blocks} {what} blocks of "
                         f"size {block_size} ({blocks * block_size} features)")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_input(t):
    """``t`` as the operators' autocast rule casts it (the rule of ``nn.Linear``):
    under autocast for ``t``'s device, a float32 or 16-bit ``t`` in the autocast dtype;
    float64 and anything else unchanged.  Modules cast before checking that input and
    weight agree."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, *LOW_PRECISION) \
            and torch.amp.is_autocast_available(t.device.type) and torch.is_autocast_enabled(t.device.type):
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def unbatched_image(x) -> bool:
    """Whether ``x`` is one unbatched ``(C, H, W)`` image (a conv layer adds the batch)."""
    return isinstance(x, torch.Tensor) and x.dim() == 3


def check_image_batch(x) -> None:
    """``x`` is a batch of images ``(N, C, H, W)``."""
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(x.shape)}")


def check_module_input(x, w: torch.Tensor, features: int, dim: int, what: str) -> None:
    """``x`` fits a layer with weight ``w``: a float tensor of ``w``'s dtype and device
    with ``features`` entries along ``dim``."""
    check_tensor("x", x)
    check_same_placement(x, w)
    if x.dim() == 0:
        raise ValueError(f"x must have {features} {what} along dim {dim}, got a 0-D tensor")
    if x.shape[dim] != features:
        raise ValueError(f"x has {x.shape[dim]} {what} (shape {tuple(x.shape)}) but the layer takes {features}")
