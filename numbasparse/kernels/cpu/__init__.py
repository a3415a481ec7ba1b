"""numba.njit kernels for CPUs.

On AVX-512 CPUs LLVM emits 256-bit vectors unless told otherwise, which halves the
arithmetic rate of auto-vectorized loops.  Before the first numba compilation in the
process we therefore ask numba's code generator for full-width vectors (the host's
own feature list plus ``-prefer-256-bit``).  This applies process-wide, only when no
compilation has happened yet, and never overrides ``NUMBA_CPU_FEATURES``.
``VECTOR_BYTES`` is the width of the explicit SIMD vectors the kernels use: 64 on
AVX-512 hosts, else 32.  Set ``NUMBASPARSE_VECTOR_WIDTH=256`` to keep both at 256 bits.
"""
import os


def _host_features() -> set:
    try:
        import llvmlite.binding as llvm

        return set(llvm.get_host_cpu_features().flatten().split(","))
    except Exception:  # unknown host: assume nothing
        return set()


def _configure() -> int:
    if os.environ.get("NUMBASPARSE_VECTOR_WIDTH") == "256":
        return 32
    features = _host_features()
    if "+avx512f" not in features:
        return 32
    from numba.core import config

    if not os.environ.get("NUMBA_CPU_FEATURES") and not config.CPU_FEATURES:
        config.CPU_FEATURES = ",".join(sorted(features)) + ",-prefer-256-bit"
    return 64


VECTOR_BYTES = _configure()
