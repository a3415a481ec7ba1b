"""numbasparse: block-sparse neural-network kernels in pure Python with numba.

``numba.cuda`` kernels for NVIDIA GPUs and ``numba.njit`` kernels for CPUs, bridged
into PyTorch without copies, with autograd and ``torch.nn`` modules.
"""
from .kernels import cpu as _cpu_code_generator  # noqa: F401  (configures numba before any compile)
from . import functional, layouts  # noqa: E402
from .functional import block_sparse_conv2d, block_sparse_lstm, block_sparse_matmul
from .layout import BlockLayout
from .nn import BlockSparseLinear, BlocksparseMatMul
from .nn_conv import BlockSparseConv2d
from .nn_lstm import BlockSparseLSTM
from .nn_lsh import LSHOutputLayer, sampled_softmax_loss
from .row_adam import RowSparseAdam
from .convert import SparsifyReport, sparsify

__version__ = "0.1.0"

__all__ = ["BlockLayout", "layouts", "functional", "block_sparse_matmul", "block_sparse_conv2d",
           "block_sparse_lstm", "BlockSparseLinear", "BlocksparseMatMul",
           "BlockSparseConv2d", "BlockSparseLSTM", "LSHOutputLayer", "sampled_softmax_loss", "RowSparseAdam",
           "sparsify", "SparsifyReport",
           "set_num_threads", "get_num_threads", "learn", "__version__"]


def set_num_threads(n: int | None) -> None:
    """Threads the CPU kernels use; ``None`` (the default) follows ``torch.get_num_threads()``.

    The kernels run on torch's own OpenMP threads: with ``n`` up to
    ``torch.get_num_threads()`` they use that many of torch's threads; a larger ``n``
    makes OpenMP start more threads for them.
    """
    from .kernels.cpu import runtime

    runtime.set_num_threads(n)


def __getattr__(name):
    if name == "learn":  # numbasparse.learn without importing it first
        import importlib

        return importlib.import_module(".learn", __name__)
    raise AttributeError(f"module 'numbasparse' has no attribute {name!r}")


def get_num_threads() -> int:
    """Threads the CPU kernels use (see :func:`set_num_threads`)."""
    from .kernels.cpu import runtime

    return runtime.get_num_threads()
