"""numba.njit(parallel=True) kernels for CPUs.

On AVX-512 CPUs LLVM emits 256-bit vectors unless told otherwise, which halves the
arithmetic rate of the kernels' inner loops.  Before the first numba compilation in
the process we therefore ask numba's code generator for full-width vectors (the
host's own feature list plus ``-prefer-256-bit``).  This applies process-wide, only
when no compilation has happened yet, and never overrides ``NUMBA_CPU_FEATURES``;
set ``NUMBASPARSE_VECTOR_WIDTH=256`` to keep LLVM's default.
"""
import os


def _prefer_full_width_vectors() -> None:
    if os.environ.get("NUMBASPARSE_VECTOR_WIDTH") == "256" or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    from numba.core import config

    if config.CPU_FEATURES:
        return
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    except Exception:  # unknown host: keep numba's defaults
        return
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


_prefer_full_width_vectors()
