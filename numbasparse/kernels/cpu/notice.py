"""One line on stderr when a kernel's first use pauses to compile it.

numba compiles each kernel the first time it is used (a few seconds) and caches the
machine code on disk, so later processes load it in a fraction of a second.  The
first compilation in a process that takes longer than ``DELAY`` seconds prints one
line saying so; nothing is printed for cache loads or on later calls.  Set
``NUMBASPARSE_QUIET=1`` to silence it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

DELAY = 1.0
_announced = False
_seen: set = set()


def _announce(what: str) -> None:
    global _announced
    if _announced or os.environ.get("NUMBASPARSE_QUIET"):
        return
    _announced = True
    sys.stderr.write(f"numbasparse: compiling {what}; this happens once, numba caches the machine code on disk\n")
    sys.stderr.flush()


@contextlib.contextmanager
def compiling(key, what: str):
    """Around the first call that may compile ``key``: announce ``what`` if the call
    takes longer than DELAY.  Later calls with the same key cost a set lookup."""
    if _announced or key in _seen:
        yield
        return
    timer = threading.Timer(DELAY, _announce, (what,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _seen.add(key)
