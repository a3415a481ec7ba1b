"""JIT cost of the CPU kernels: first call after a cold cache, and import-to-first-result
with a warm cache, each measured in a fresh Python process with its own NUMBA_CACHE_DIR."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_PROBE = r"""
import json, time
t0 = time.perf_counter()
import torch
import numbasparse as ns
from numbasparse import backend
t_import = time.perf_counter() - t0
layout = ns.layouts.random(8, 8, 0.5, seed=0)
B = 32
x = torch.randn(64, 8 * B); dy = torch.randn(64, 8 * B); w = torch.randn(layout.capacity, B, B)
out = {"import_s": t_import}
for name, fn in (("forward", lambda: backend.forward(x, w, layout, B)),
                 ("backward_data", lambda: backend.backward_data(dy, w, layout, B)),
                 ("backward_weight", lambda: backend.backward_weight(x, dy, layout, B))):
    t = time.perf_counter(); fn(); out[name + "_first_call_s"] = time.perf_counter() - t
    t = time.perf_counter(); fn(); out[name + "_second_call_s"] = time.perf_counter() - t
out["import_to_first_results_s"] = time.perf_counter() - t0
print(json.dumps(out))
"""


def _probe(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_times() -> dict:
    """``{"cold": {...}, "warm": {...}}`` seconds, from two fresh processes sharing one cache."""
    with tempfile.TemporaryDirectory(prefix="numbasparse-cache-") as cache_dir:
        cold = _probe(cache_dir)
        warm = _probe(cache_dir)
    return {"cold": cold, "warm": warm}


def format_compile(times: dict) -> str:
    keys = [k for k in times["cold"]]
    lines = [f"{'JIT (seconds)':<32}{'cold cache':>12}{'warm cache':>12}"]
    for k in keys:
        lines.append(f"{k:<32}{times['cold'][k]:>12.3f}{times['warm'][k]:>12.3f}")
    return "\n".join(lines)
