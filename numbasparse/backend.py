"""Backend: picks a kernel set from a tensor's device and hands torch tensors to it
without copies.

* CPU tensors reach the CPU matmul programs as addresses (``Tensor.data_ptr()``: no
  copy, no numpy view) and the CPU conv kernels as numpy views (``Tensor.numpy()``).
* CUDA tensors reach the numba.cuda kernels through the CUDA array interface
  (``cuda.as_cuda_array(t, sync=False)``: no copy, no host synchronization) and the
  kernels are launched on torch's current CUDA stream of the tensor's device.
* ``simulate_cuda()`` (tests only) runs the numba.cuda kernels on CPU tensors under
  numba's CUDA simulator, which needs ``NUMBA_ENABLE_CUDASIM=1`` before numba is
  imported.

Two entries per operation:

* ``forward`` / ``backward`` / ``backward_data`` / ``backward_weight`` (public) check
  their arguments against the layout first (tensor types, dtypes, devices, shapes,
  contiguity, block size) and raise ValueError / TypeError naming the problem;
* ``_forward`` / ``_backward`` (private) skip the checks: they take contiguous 2-D
  activations and ``(capacity, B, B)`` weights already checked by the caller
  (:mod:`numbasparse.functional`), since the checks cost microseconds per call.

Neither checks the layout's index tables: a :class:`BlockLayout` builds them from its
mask, so they fit any tensor shaped for the layout, and the kernels are called
through their unchecked launchers (the checked CUDA wrappers would copy device tables
to the host on every call).  All return new tensors.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from ._checks import LOW_PRECISION, check_block_size, check_features, check_tensor, check_weight_shape
from .kernels.checks import conv_output_size
from .kernels.cpu import matmul as cpu_matmul
from .layout import BlockLayout

__all__ = ["forward", "backward", "backward_data", "backward_weight", "simulate_cuda", "cuda_usable"]

_simulating = False
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


@contextlib.contextmanager
def simulate_cuda(enabled: bool = True):
    """Run the numba.cuda kernels on CPU tensors under numba's CUDA simulator."""
    global _simulating
    if enabled:
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise RuntimeError("simulate_cuda() needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported")
    previous, _simulating = _simulating, enabled
    try:
        yield
    finally:
        _simulating = previous


def cuda_usable() -> bool:
    """True when numba.cuda can launch kernels on a real GPU."""
    try:
        from numba import config, cuda
    except ImportError:
        return False
    if config.ENABLE_CUDASIM:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reads as "no GPU"
        return False


def _check_cuda_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16:
        raise TypeError("bfloat16 tensors are not supported by the numba.cuda kernels (float16 is): use "
                        "torch.autocast('cuda', dtype=torch.float16) or .half() on CUDA")


def _kernels(module: str, device: torch.device, dtype: torch.dtype | None = None):
    """The kernel module (``matmul``, ``conv``...) for tensors of ``dtype`` on ``device``."""
    if device.type == "cpu":
        target = "cuda" if _simulating else "cpu"
    elif device.type == "cuda":
        if not cuda_usable():
            raise ValueError(
                f"tensors are on {device} but numba.cuda cannot use a GPU here "
                "(install numbasparse[cuda12] or [cuda13] matching your driver, "
                "or move the tensors to the CPU)")
        target = "cuda"
    else:
        raise ValueError(f"unsupported device {device}: numbasparse runs on 'cpu' and 'cuda' tensors")
    if target == "cuda":
        _check_cuda_dtype(dtype)
    return importlib.import_module(f"numbasparse.kernels.{target}.{module}"), target


class _Launch:
    """Turns tensors into kernel arguments for one target and supplies the stream."""

    def __init__(self, target: str, device: torch.device):
        self.target = target
        self.device = device
        self.stream = 0
        self._context = contextlib.nullcontext()
        if target == "cuda" and device.type == "cuda":
            from numba import cuda

            index = device.index if device.index is not None else torch.cuda.current_device()
            self._context = cuda.gpus[index]
            with self._context:
                self.stream = cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)

    def __enter__(self):
        self._context.__enter__()
        return self

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)

    def array(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        if self.device.type == "cuda":
            from numba import cuda

            return cuda.as_cuda_array(tensor, sync=False)
        return tensor.numpy()

    def tables(self, layout: BlockLayout, *names):
        if self.device.type == "cuda":
            tables = layout._tables_on(self.device)
            return [self.array(tables[n]) for n in names]
        return [getattr(layout, n) for n in names]


def _on_cpu_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not _simulating


# ------------------------------------------------------------------ unchecked
def _forward(x: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Unchecked :func:`forward`."""
    y = torch.empty((x.shape[0], layout.out_blocks * block_size), dtype=x.dtype, device=x.device)
    if _on_cpu_kernels(x):
        cpu_matmul._layout_forward(x, w, layout, block_size, y, _DTYPE_NAMES[x.dtype], x.element_size(), bias)
        return y
    if bias is not None:
        return _forward(x, w, layout, block_size).add_(bias)
    kernels, target = _kernels("matmul", x.device, x.dtype)
    with _Launch(target, x.device) as launch:
        kernels._forward(launch.array(x), launch.array(w),
                         *launch.tables(layout, "col_ptr", "col_rows", "col_slots"),
                         block_size, launch.array(y), **_stream_kw(target, launch))
    return y


def _backward(dy: torch.Tensor, x: torch.Tensor | None, w: torch.Tensor | None, layout: BlockLayout,
              block_size: int, need_dx: bool = True, need_dw: bool = True):
    """Unchecked :func:`backward`."""
    dx = torch.empty((dy.shape[0], layout.in_blocks * block_size), dtype=dy.dtype, device=dy.device) \
        if need_dx else None
    dw = torch.zeros((layout.capacity, block_size, block_size), dtype=dy.dtype, device=dy.device) \
        if need_dw else None
    if not (need_dx or need_dw):
        return dx, dw
    if _on_cpu_kernels(dy):
        cpu_matmul._layout_backward(x, dy, w, layout, block_size, dx, dw, _DTYPE_NAMES[dy.dtype],
                                   dy.element_size())
        return dx, dw
    kernels, target = _kernels("matmul", dy.device, dy.dtype)
    with _Launch(target, dy.device) as launch:
        if need_dx:
            kernels._backward_data(launch.array(dy), launch.array(w),
                                   *launch.tables(layout, "row_ptr", "row_cols", "row_slots"),
                                   block_size, launch.array(dx), **_stream_kw(target, launch))
        if need_dw:
            kernels._backward_weight(launch.array(x), launch.array(dy),
                                     *launch.tables(layout, "entry_rows", "entry_cols", "entry_slots"),
                                     block_size, launch.array(dw), **_stream_kw(target, launch))
    return dx, dw


# ------------------------------------------------------------------- checked
def forward(x: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (N, out_blocks*B) = x (N, in_blocks*B) @ W (+ bias (out_blocks*B,)).

    ``w`` is ``(layout.capacity, B, B)``; all tensors contiguous, of one dtype (float32,
    float64, float16 or bfloat16 - not bfloat16 on CUDA - computed in float32 for the
    16-bit ones) and on one device.  Checked: raises ValueError / TypeError on a bad
    argument.
    """
    B = _check_call(layout, block_size, {"x": x, "w": w, "bias": bias})
    check_features("x", x.shape[1], layout.in_blocks, B, "input")
    if bias is not None and tuple(bias.shape) != (layout.out_blocks * B,):
        raise ValueError(f"bias must have shape ({layout.out_blocks * B},), got {tuple(bias.shape)}")
    return _forward(x, w, layout, B, bias)


def backward(dy: torch.Tensor, x: torch.Tensor | None, w: torch.Tensor | None, layout: BlockLayout,
             block_size: int, need_dx: bool = True, need_dw: bool = True):
    """``(dx, dw)``: dx (N, in_blocks*B) = dy (N, out_blocks*B) @ W^T (needs ``w``) and
    dw (capacity, B, B) = x^T dy at the live blocks, zeros in free slots (needs ``x``);
    ``None`` for a gradient not asked for (its operand may then be ``None``).  On the
    CPU both come from one kernel launch that packs dy once.  Checked as :func:`forward`.
    """
    if need_dx and w is None:
        raise TypeError("backward needs w to compute dx (need_dx=True)")
    if need_dw and x is None:
        raise TypeError("backward needs x to compute dw (need_dw=True)")
    tensors = {"dy": dy, "x": x if need_dw else None, "w": w if need_dx else None}
    B = _check_call(layout, block_size, tensors)
    check_features("dy", dy.shape[1], layout.out_blocks, B, "output")
    if tensors["x"] is not None:
        check_features("x", x.shape[1], layout.in_blocks, B, "input")
        if x.shape[0] != dy.shape[0]:
            raise ValueError(f"row mismatch: x has {x.shape[0]} rows, dy has {dy.shape[0]}")
    return _backward(dy, tensors["x"], tensors["w"], layout, B, bool(need_dx), bool(need_dw))


def backward_data(dy: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """dx (N, in_blocks*B) = dy (N, out_blocks*B) @ W^T.  Checked as :func:`forward`."""
    return backward(dy, None, w, layout, block_size, need_dw=False)[0]


def backward_weight(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """dw (capacity, B, B): x^T dy at the live blocks, zeros in free slots.  Checked as
    :func:`forward`."""
    return backward(dy, x, None, layout, block_size, need_dx=False)[1]


def _check_call(layout, block_size, tensors: dict) -> int:
    """The block size, after checking the layout's type, the block size and the tensors
    (``None`` entries skipped): torch tensors of a supported dtype, all of one dtype and
    device, contiguous; ``w`` shaped ``(layout.capacity, B, B)``, ``bias`` 1-D and the
    others 2-D."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    B = check_block_size(block_size)
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if first is None:
            first = name, t
        elif t.device != first[1].device:
            raise ValueError(f"{first[0]} is on {first[1].device} but {name} is on {t.device}: "
                             "move them to one device")
        elif t.dtype != first[1].dtype:
            raise TypeError(f"{first[0]} has dtype {first[1].dtype} but {name} has dtype {t.dtype}: "
                            "use one dtype")
        if name == "w":
            check_weight_shape(t, layout, B)
        elif t.dim() != (1 if name == "bias" else 2):
            raise ValueError(f"{name} must be {'1-D' if name == 'bias' else '2-D (N, features)'}, "
                             f"got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return B


def _stream_kw(target, launch):
    return {"stream": launch.stream} if target == "cuda" else {}


# ---------------------------------------------------------------------- conv
def _conv_kernel(name: str, device: torch.device, dtype: torch.dtype):
    """``(kernel function, target)`` for tensors of ``dtype`` on ``device``.  On CUDA targets the
    unchecked launcher: the tables are a BlockLayout's (valid by construction) and
    :func:`~numbasparse.conv.block_sparse_conv2d` checked the tensors against it; the checked wrapper
    would copy the device tables to the host on every call.  The CPU conv functions
    check their arguments themselves (cheap next to a convolution)."""
    kernels, target = _kernels("conv", device, dtype)
    return getattr(kernels, "_" + name if target == "cuda" else name), target


def _conv_forward(x, w, layout, block_size, stride, padding, dilation):
    """y (N, K, Ho, Wo) from the kernels; ``padding = (top, left, bottom, right)``.
    On CPU, 16-bit tensors are widened to float32 for the kernels and the result is
    rounded back (the CPU conv kernels compute in float32 or float64 only)."""
    kernel, target = _conv_kernel("forward", x.device, x.dtype)
    if target == "cpu" and x.dtype in LOW_PRECISION:
        return _conv_forward(x.float(), w.float(), layout, block_size, stride, padding, dilation).to(x.dtype)
    size = conv_output_size(tuple(x.shape[2:]), tuple(w.shape[1:3]), stride, padding, dilation)
    y = torch.empty((x.shape[0], layout.out_blocks * block_size, *size), dtype=x.dtype, device=x.device)
    with _Launch(target, x.device) as launch:
        kernel(launch.array(x), launch.array(w), *launch.tables(layout, "col_ptr", "col_rows", "col_slots"),
               block_size, stride, padding, dilation, launch.array(y), **_stream_kw(target, launch))
    return y


def _conv_backward_data(dy, w, layout, block_size, stride, padding, dilation, input_size):
    kernel, target = _conv_kernel("backward_data", dy.device, dy.dtype)
    if target == "cpu" and dy.dtype in LOW_PRECISION:
        return _conv_backward_data(dy.float(), w.float(), layout, block_size, stride, padding, dilation,
                                   input_size).to(dy.dtype)
    dx = torch.empty((dy.shape[0], layout.in_blocks * block_size, *input_size), dtype=dy.dtype, device=dy.device)
    with _Launch(target, dy.device) as launch:
        kernel(launch.array(dy), launch.array(w), *launch.tables(layout, "row_ptr", "row_cols", "row_slots"),
               block_size, stride, padding, dilation, launch.array(dx), **_stream_kw(target, launch))
    return dx


def _conv_backward_weight(x, dy, w_shape, layout, block_size, stride, padding, dilation):
    kernel, target = _conv_kernel("backward_weight", x.device, x.dtype)
    if target == "cpu" and x.dtype in LOW_PRECISION:
        return _conv_backward_weight(x.float(), dy.float(), w_shape, layout, block_size, stride, padding,
                                     dilation).to(x.dtype)
    dw = torch.zeros(w_shape, dtype=x.dtype, device=x.device)
    with _Launch(target, x.device) as launch:
        kernel(launch.array(x), launch.array(dy), *launch.tables(layout, "row_ptr", "row_cols", "row_slots"),
               block_size, stride, padding, dilation, launch.array(dw), **_stream_kw(target, launch))
    return dw
