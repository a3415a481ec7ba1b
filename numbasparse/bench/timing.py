"""Timing helpers: warm-up, then the median of repeated runs (device-synchronized)."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str = "cpu", repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` runs.

    On CUDA every run is bracketed by CUDA events.  ``min_time`` (seconds) adds
    repeats until that much time has been measured, so fast cases get more samples.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    spent = 0.0
    while len(samples) < repeats or spent < min_time:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        spent += ms / 1e3
        if len(samples) >= 50 * max(repeats, 1):
            break
    return statistics.median(samples)


class Progress:
    """One status line per measurement, rewritten in place on a terminal."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        import sys

        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done:>3}/{self.total}] {elapsed:6.1f}s  {what}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
