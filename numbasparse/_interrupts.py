"""Holding back Ctrl-C while a change spanning several objects is made, so that a
``KeyboardInterrupt`` finds either the state before the change or the state after it."""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    """Run the block with SIGINT held back; a SIGINT received meanwhile is delivered
    (as the previous handler would have: ``KeyboardInterrupt`` by default) when the
    block ends.  The previous handler is always restored.  Outside the main thread
    (where Python never raises ``KeyboardInterrupt``) this does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # None: a handler installed outside Python, which could not be put back
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except (ValueError, TypeError, OSError):  # no signal handling here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)
