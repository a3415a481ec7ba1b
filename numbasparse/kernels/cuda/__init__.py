"""numba.cuda kernels (import the submodules, e.g. ``numbasparse.kernels.cuda.matmul``)."""
