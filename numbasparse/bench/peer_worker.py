"""Times an ONNX model in another Python environment, for ``python -m numbasparse.bench
--model --peer-python PATH``: peers such as DeepSparse need packages (numpy<2) that
cannot live beside numbasparse, so the bench runs this script with that environment's
interpreter as a subprocess and reads one line of JSON from its standard output.

Standard library, numpy and the engine only: this file imports nothing from numbasparse
(it is run by path, not as a module of the package).

    python peer_worker.py --probe
        -> {"engine": "deepsparse", "version": ..., "numpy": ...} or {"error": ...}
    python peer_worker.py --onnx MODEL --batch 1 64 256 --threads 2 --repeats 5
                          [--check-input X.npy --check-output Y.npy]
        -> {"engine": ..., "ms": {"1": ..., ...}, "calls_per_sample": {...},
            "max_abs_diff": {...}} or {"error": ...}

One engine per batch size (``deepsparse.compile_model(path, batch_size=b,
num_cores=threads)``), all compiled first; then interleaved rounds, one sample of each
batch per round, as the bench times its own rows: warm-up, at least ``--repeats``
rounds and more while all rounds took under 0.25 s, samples of several calls for
sub-millisecond runs, the median reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ENGINE = "deepsparse"


def _emit(obj) -> None:
    sys.stdout.write("\n" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _import_engine():
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network calls from the engine
    import numpy
    import deepsparse

    return deepsparse, numpy


def _sample_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def _time(fns: dict, repeats: int, budget_s: float = 4.0, short_s: float = 0.25, max_rounds: int = 60,
          target_ms: float = 2.0, max_calls: int = 100):
    """Median ms per call of each function, interleaved rounds (see the module doc)."""
    calls = {}
    for name, fn in fns.items():
        started, runs = time.perf_counter(), 0
        while runs < 1 or (runs < 20 and time.perf_counter() - started < short_s / 4):
            fn()
            runs += 1
        one = min(_sample_ms(fn, 1) for _ in range(3))
        calls[name] = max(1, min(max_calls, math.ceil(target_ms / max(one, 1e-3))))
    samples = {name: [] for name in fns}
    started, round_ = time.perf_counter(), 0
    while round_ < max_rounds:
        for name, fn in fns.items():
            samples[name].append(_sample_ms(fn, calls[name]))
        round_ += 1
        elapsed = time.perf_counter() - started
        if round_ >= repeats and elapsed >= short_s:
            break
        if round_ >= 3 and elapsed > budget_s:
            break
    return {name: statistics.median(v) for name, v in samples.items()}, calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", action="store_true", help="only report whether the engine imports")
    p.add_argument("--onnx", help="ONNX file whose first input has a free batch dimension")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1, help="cores for the engine")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-input", help=".npy input of at least max(batch) rows")
    p.add_argument("--check-output", help=".npy expected output for --check-input")
    args = p.parse_args(argv)
    try:
        deepsparse, np = _import_engine()
    except Exception as exc:  # ImportError, or an engine that fails while loading
        _emit({"error": f"import {ENGINE} failed: {_one_line(exc)}"})
        return 0
    info = {"engine": ENGINE, "version": getattr(deepsparse, "__version__", "?"), "numpy": np.__version__,
            "python": sys.version.split()[0]}
    if args.probe:
        _emit(info)
        return 0
    if not args.onnx:
        _emit({"error": "--onnx is required"})
        return 2
    try:
        engines = {b: deepsparse.compile_model(args.onnx, batch_size=b, num_cores=args.threads)
                   for b in args.batch}
        input_shape = None
        check = {}
        if args.check_input and args.check_output:
            x_check, y_check = np.load(args.check_input), np.load(args.check_output)
            input_shape = x_check.shape[1:]
            for b, engine in engines.items():
                got = engine([np.ascontiguousarray(x_check[:b])])[0]
                check[str(b)] = float(np.max(np.abs(got.reshape(y_check[:b].shape) - y_check[:b])))
        if input_shape is None:
            raise ValueError("--check-input and --check-output are required (they give the input shape)")
        rng = np.random.default_rng(args.seed)
        inputs = {b: [rng.standard_normal((b, *input_shape), dtype=np.float32)] for b in args.batch}
        fns = {b: (lambda e=engines[b], x=inputs[b]: e(x)) for b in args.batch}
        ms, calls = _time(fns, args.repeats)
    except Exception as exc:
        _emit({"error": f"{ENGINE} failed: {_one_line(exc)}", **info})
        return 0
    _emit({**info, "threads": args.threads, "ms": {str(b): t for b, t in ms.items()},
           "calls_per_sample": {str(b): c for b, c in calls.items()}, "max_abs_diff": check})
    return 0


if __name__ == "__main__":
    sys.exit(main())
