"""numba.njit(parallel=True) kernels for CPUs."""
