"""Timing helpers: warm-up, then the median of repeated runs (device-synchronized)."""
from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup`` runs.

    On CUDA every run is bracketed by CUDA events.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
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
    return statistics.median(samples)


def interleaved_ms(fns: dict, device: str = "cpu", repeats: int = 5, warmup: int = 1,
                   budget_s: float = 4.0, short_s: float = 0.25, max_rounds: int = 60) -> dict:
    """Median milliseconds of each function in ``fns``, timed in interleaved rounds
    (one run of each per round), so that a machine whose speed drifts during the run
    (turbo, other processes) shifts every implementation alike.

    Each function is first run ``warmup`` times, and more while its warm-up has taken
    under ``short_s / 4`` seconds (at most 20 runs): sub-millisecond calls take a few
    dozen runs to reach their steady state (caches, threads, first-use copies).
    Rounds stop after ``repeats``, or earlier once ``budget_s`` is spent and at least 3
    rounds are done; while all rounds so far took less than ``short_s`` in total they
    continue (up to ``max_rounds``), so that fast calls get enough samples.
    """
    for fn in fns.values():
        started = time.perf_counter()
        runs = 0
        while runs < warmup or (runs < 20 and time.perf_counter() - started < short_s / 4):
            fn()
            runs += 1
    synchronize(device)
    samples = {name: [] for name in fns}
    started = time.perf_counter()
    round_ = 0
    while round_ < max_rounds:
        for name, fn in fns.items():
            samples[name].append(median_ms(fn, device, repeats=1, warmup=0))
        round_ += 1
        elapsed = time.perf_counter() - started
        if round_ >= repeats and elapsed >= short_s:
            break
        if round_ >= 3 and elapsed > budget_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}


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
