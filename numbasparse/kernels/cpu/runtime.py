"""Running the CPU kernels on several threads: on torch's own OpenMP threads.

A CPU kernel here is a *program*: a ``numba.cfunc`` taking one pointer to an int64
argument block (see :mod:`.args`).  Every thread that runs the program takes tasks
from a shared atomic counter in the block until none are left, so the work balances
itself across threads (a core slowed by another process takes fewer tasks) and the
result never depends on the thread count (each task owns its outputs).

Where the threads come from:

* **torch's OpenMP team** (the default on Linux builds of torch, which link GNU or
  Intel OpenMP): the program is started with ``GOMP_parallel`` of the very OpenMP
  library torch uses, so it runs on the threads that run torch's own operators.  A
  second thread pool would compete with them: OpenMP threads spin for milliseconds
  after each parallel region, so a pool of our own next to torch's ran our kernels up
  to 2x slower whenever they followed a torch operator.
* **a small pool of Python threads** where that library is not available (other
  builds of torch) and in forked child processes (GNU OpenMP cannot run a parallel
  region in a child forked after the parent ran one: it waits forever for the parent's
  threads).  The program releases the GIL, so these threads run in parallel.  A child
  forked after the kernels ran on torch's team gets torch set to one thread (as
  DataLoader workers do), so that torch's own operators do not wait for those threads
  either; the kernels follow it unless :func:`numbasparse.set_num_threads` asked for a
  count.
* **the calling thread alone** when one thread is asked for, or when the work is too
  small to be worth waking others (see :func:`threads_for`).

The thread count follows ``torch.get_num_threads()`` unless
:func:`numbasparse.set_num_threads` set one.
"""
from __future__ import annotations

import ctypes
import glob
import numbers
import os
import threading

import torch

__all__ = ["threads_for", "get_num_threads", "set_num_threads", "backend_name"]

#: Below this much work a kernel runs on the calling thread only.  Work is counted in
#: floating-point operations plus ``BYTE_WEIGHT`` per byte of weights streamed (a
#: batch-1 forward does 2 operations per 4-byte weight but is bound by memory).
SERIAL_WORK = 4_000_000
BYTE_WEIGHT = 16

_PROGRAM_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_requested_threads: int | None = None
_forked = False
_team_used = False               # a kernel ran on torch's OpenMP team in this process
_lock = threading.Lock()


def get_num_threads() -> int:
    """Threads the CPU kernels use: ``set_num_threads``'s value, else torch's."""
    return _requested_threads or torch.get_num_threads()


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads in the CPU kernels (``None``: follow ``torch.get_num_threads()``)."""
    global _requested_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"the number of threads must be a positive integer, got {n!r}")
        n = int(n)
    _requested_threads = n


def threads_for(flops: float, weight_bytes: float = 0.0) -> int:
    """How many threads a kernel doing ``flops`` operations over ``weight_bytes`` of
    weights should use."""
    threads = get_num_threads()
    work = flops + BYTE_WEIGHT * weight_bytes
    if threads <= 1 or work < SERIAL_WORK:
        return 1
    # one more thread per half SERIAL_WORK: a thread's share is never tiny
    return int(min(threads, max(2, work // max(SERIAL_WORK // 2, 1))))


# ----------------------------------------------------------------- OpenMP team
def _openmp_library():
    """The OpenMP library torch's operators run on, or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    torch_dir = os.path.dirname(torch.__file__)
    names = ("libgomp", "libiomp5", "libomp")
    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if path.startswith("/") and os.path.basename(path).startswith(names):
                    candidates.append(path)
    except OSError:
        candidates = [p for n in names for p in glob.glob(os.path.join(torch_dir, "lib", n + "*"))]
    candidates = sorted(set(candidates), key=lambda p: not p.startswith(torch_dir))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            parallel = lib.GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        return parallel
    return None


_gomp_parallel = None
_gomp_checked = False


def _team_launcher():
    global _gomp_parallel, _gomp_checked
    if not _gomp_checked:
        with _lock:
            if not _gomp_checked:
                _gomp_parallel = _openmp_library()
                _gomp_checked = True
    return None if _forked else _gomp_parallel


def backend_name() -> str:
    """``"openmp"`` (torch's OpenMP threads) or ``"threads"`` (a pool of Python threads)."""
    return "openmp" if _team_launcher() is not None else "threads"


# ----------------------------------------------------------- Python thread pool
class _ThreadPool:
    """Daemon threads that each run one call at a time (the calls release the GIL).

    ``run(call, arg, helpers)`` runs ``call(arg)`` on the calling thread and on
    ``helpers`` pool threads at once, waits for all of them, and re-raises the first
    exception any of them raised.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._jobs = []
        self._threads = []

    def run(self, call, arg, helpers):
        errors = []
        with self._cond:
            while len(self._threads) < helpers:
                thread = threading.Thread(target=self._loop, daemon=True, name="numbasparse-cpu")
                thread.start()
                self._threads.append(thread)
            finished = threading.Semaphore(0)
            for _ in range(helpers):
                self._jobs.append((call, arg, finished, errors))
            self._cond.notify(helpers)
        interrupted = None
        try:
            call(arg)
        finally:
            # the helpers use the caller's arrays: wait for them even through Ctrl-C
            for _ in range(helpers):
                while True:
                    try:
                        finished.acquire()
                        break
                    except BaseException as exc:  # noqa: B036 - re-raised below
                        interrupted = exc
        if interrupted is not None:
            raise interrupted
        if errors:
            raise errors[0]

    def _loop(self):
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                call, arg, finished, errors = self._jobs.pop(0)
            try:
                call(arg)
            except BaseException as exc:  # reported by the caller
                errors.append(exc)
            finally:
                finished.release()


_pool = _ThreadPool()
_callables: dict = {}


def _callable(program):
    fn = _callables.get(program.address)
    if fn is None:
        fn = _callables[program.address] = _PROGRAM_TYPE(program.address)
    return fn


def _launch(program, address: int, threads: int) -> None:
    """Run ``program`` (a cfunc ``void(void*)``) on the argument block at ``address``
    with ``threads`` threads.

    The block and every array it points to must stay alive until this returns (it
    returns when all threads are done).
    """
    if threads <= 1:
        _callable(program)(address)
        return
    global _team_used
    team = _team_launcher()
    if team is not None:
        _team_used = True
        team(program.address, address, threads, 0)
    else:
        _pool.run(_callable(program), address, threads - 1)


def _after_fork_in_child():
    global _forked, _pool, _team_used
    _forked = True
    _pool = _ThreadPool()
    if _team_used:
        _team_used = False
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
