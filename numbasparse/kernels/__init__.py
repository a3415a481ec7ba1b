"""Kernel sets: ``cpu`` (numba.njit) and ``cuda`` (numba.cuda), with the same signatures."""
