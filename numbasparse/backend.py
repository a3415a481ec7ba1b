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

Every function here takes contiguous 2-D activations and ``(capacity, B, B)``
weights already validated by :mod:`numbasparse.functional` and returns new tensors.
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from .kernels.cpu import matmul as cpu_matmul
from .layout import BlockLayout

__all__ = ["forward", "backward", "backward_data", "backward_weight", "simulate_cuda", "cuda_usable"]

_simulating = False
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


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


def _kernels(module: str, device: torch.device):
    """The kernel module (``matmul``, ``conv``...) for tensors on ``device``."""
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
            tables = layout.tables_on(self.device)
            return [self.array(tables[n]) for n in names]
        return [getattr(layout, n) for n in names]


def _on_cpu_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not _simulating


def forward(x: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (N, out_blocks*B) = x (N, in_blocks*B) @ W (+ bias, contiguous (out_blocks*B,))."""
    y = torch.empty((x.shape[0], layout.out_blocks * block_size), dtype=x.dtype, device=x.device)
    if _on_cpu_kernels(x):
        cpu_matmul._layout_forward(x, w, layout, block_size, y, _DTYPE_NAMES[x.dtype], x.element_size(), bias)
        return y
    if bias is not None:
        return forward(x, w, layout, block_size).add_(bias)
    kernels, target = _kernels("matmul", x.device)
    with _Launch(target, x.device) as launch:
        kernels.forward(launch.array(x), launch.array(w),
                        *launch.tables(layout, "col_ptr", "col_rows", "col_slots"),
                        block_size, launch.array(y), **_stream_kw(target, launch))
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int,
             need_dx: bool = True, need_dw: bool = True):
    """``(dx, dw)``: dx (N, in_blocks*B) = dy @ W^T and dw (capacity, B, B) = x^T dy at
    the live blocks (zeros in free slots); ``None`` for a gradient not asked for.  On
    the CPU both come from one kernel launch that packs dy once."""
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
    kernels, target = _kernels("matmul", dy.device)
    with _Launch(target, dy.device) as launch:
        if need_dx:
            kernels.backward_data(launch.array(dy), launch.array(w),
                                  *launch.tables(layout, "row_ptr", "row_cols", "row_slots"),
                                  block_size, launch.array(dx), **_stream_kw(target, launch))
        if need_dw:
            kernels.backward_weight(launch.array(x), launch.array(dy),
                                    *launch.tables(layout, "entry_rows", "entry_cols", "entry_slots"),
                                    block_size, launch.array(dw), **_stream_kw(target, launch))
    return dx, dw


def backward_data(dy: torch.Tensor, w: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """dx (N, in_blocks*B) = dy (N, out_blocks*B) @ W^T."""
    return backward(dy, None, w, layout, block_size, need_dw=False)[0]


def backward_weight(x: torch.Tensor, dy: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """dw (capacity, B, B): x^T dy at the live blocks, zeros in free slots."""
    return backward(dy, x, None, layout, block_size, need_dx=False)[1]


def _stream_kw(target, launch):
    return {"stream": launch.stream} if target == "cuda" else {}
