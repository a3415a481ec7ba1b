"""Work distribution for the CPU kernels.

Kernels split their output into independent tasks and run ``max_workers()`` prange
workers, each taking a contiguous run of tasks.  Under ``dynamic_schedule()`` numba
hands the workers to threads one at a time, so a thread slowed down by another
process on its core takes fewer of them.
"""
import contextlib

import numba

WORKERS_PER_THREAD = 4


def max_workers() -> int:
    return numba.get_num_threads() * WORKERS_PER_THREAD


@contextlib.contextmanager
def dynamic_schedule():
    """prange hands out one iteration (worker) at a time instead of equal static blocks."""
    previous = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous)
