"""Benchmark: ``python -m numbasparse.bench`` (see ``--help``), or ``run(...)`` from Python.

Times block-sparse layers against dense PyTorch and its peers in one process and one
run, on the same threads: warm-up first, fresh random data, median of interleaved
rounds.  Each row reports the time, the effective GFLOP/s over live blocks only, and
the speedup against the dense PyTorch baseline of the same op and shape timed in the
same rounds (dense time / this time: above 1 is faster than dense).
"""
from __future__ import annotations

import datetime
import platform
import subprocess

import torch

from .layers import model_rows, overhead_rows
from .matmul import matmul_rows
from .timing import Progress

__all__ = ["run", "format_table", "format_summary", "machine_info", "matmul_rows", "overhead_rows", "model_rows"]


def _conv_rows(**kwargs):
    from .conv import conv_rows

    return conv_rows(**kwargs)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` threads in torch and in the kernels (which then follow torch);
    returns the count in use."""
    import numbasparse

    if threads:
        torch.set_num_threads(threads)
    numbasparse.set_num_threads(None)
    return torch.get_num_threads()


def machine_info(device: str = "cpu") -> dict:
    """Where and when the numbers were taken."""
    import numba

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "numba": numba.__version__,
            "threads": torch.get_num_threads(), "cpu": _cpu_model()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=__file__.rsplit("/", 3)[0], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(device="cpu", hidden=4096, batches=(1, 32, 256), block_sizes=(8, 16, 32),
        densities=(1.0, 0.5, 0.25, 0.1, 0.03), repeats=5, threads=None, conv=True, peers=True,
        conv_block_sizes=(16, 32), reference=True, layers=True, model_densities=(0.25, 0.1), show_progress=True,
        precision=True, precision_batches=(1, 256), precision_densities=(0.1,), lstm=True, lsh=True):
    """Run the benchmark grid; returns ``{"info": machine_info, "rows": [row dicts]}``
    and, with ``precision``, ``"precision"``: the 16-bit rows (:mod:`.precision`, block
    32, hidden ``hidden``) and, with ``lstm``, ``"lstm"``: the LSTM rows (:mod:`.recurrent`,
    hidden 1024, batch 32, 64 steps, block 32, recurrent density 0.25) and, with ``lsh``,
    ``"lsh"``: the LSH output-layer rows (:mod:`.lsh`, vocabulary 32768, hidden 512,
    batch 128)."""
    set_threads(threads)
    n_matmul = len(batches) * len(block_sizes) * len(densities) * 4
    n_conv = len(conv_block_sizes) * len(densities) * 4 if conv else 0
    n_ref = len([d for d in densities if d < 1.0]) if device == "cuda" and reference else 0
    n_layers = 2 + 2 * len(model_densities) if layers else 0
    n_precision = 3 * len(precision_batches) * len(precision_densities) if precision else 0
    n_lstm = (2 if lstm else 0) + (6 if lsh else 0)
    progress = Progress(n_matmul + n_conv + n_ref + n_layers + n_precision + n_lstm, enabled=show_progress)
    rows = matmul_rows(device, hidden, batches, block_sizes, densities, repeats, peers, progress=progress)
    if layers:
        rows += overhead_rows(device, repeats, progress=progress)
        rows += model_rows(device, repeats, densities=model_densities, progress=progress)
    if conv:
        rows += _conv_rows(device=device, repeats=repeats, block_sizes=conv_block_sizes, densities=densities,
                           progress=progress)
    if device == "cuda" and reference:
        # OpenAI's reference shape against cuBLAS fp32 (TF32 off) and BSR.
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ref = matmul_rows(device, 12288, (32,), (32,), tuple(d for d in densities if d < 1.0), repeats, True,
                              progress=progress, ops=("fwd",))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        for row in ref:
            row["op"] = "fwd (OpenAI shape)"
        rows += ref
    extra = {}
    if precision:
        from .precision import precision_rows

        extra["precision"] = precision_rows(device, hidden, precision_batches, 32, precision_densities, repeats,
                                            progress=progress)
    if lstm:
        from .recurrent import lstm_rows

        extra["lstm"] = lstm_rows(device, repeats=repeats, progress=progress)
    if lsh:
        from .lsh import lsh_rows

        extra["lsh"] = lsh_rows(device, repeats=repeats, progress=progress)
    progress.close()
    return {"info": machine_info(device), "rows": rows, **extra}


def format_table(rows) -> str:
    """Fixed-width text table of benchmark rows."""
    head = (f"{'op':<19}{'impl':<14}{'batch':>6}{'hidden':>7}{'block':>6}{'density':>8}{'ms':>10}"
            f"{'GFLOP/s':>9}{'speedup':>9}")
    legend = ("GFLOP/s counts live blocks only; speedup = dense torch ms / this row's ms, same rounds "
              "(above 1: faster than dense)")
    lines = [legend, head, "-" * len(head)]
    for r in rows:
        block = "-" if r.get("block") is None else str(r["block"])
        size = r.get("hidden", r.get("channels", ""))
        lines.append(f"{r['op']:<19}{r['impl']:<14}{r.get('batch', ''):>6}{size:>7}{block:>6}{r['density']:>8.2f}"
                     f"{r['ms']:>10.3f}{r['gflops']:>9.1f}{r['speedup_vs_dense']:>8.2f}x")
    return "\n".join(lines)


def format_summary(rows) -> str:
    """Per case: numbasparse's speedup over dense torch, its efficiency (speedup x
    density: the fraction of dense throughput reached per live block) and its speedup
    over PyTorch's BSR path."""
    by_case = {}
    for r in rows:
        if r.get("block") is None:
            continue
        key = (r["op"], r.get("batch"), r["block"], r["density"])
        by_case.setdefault(key, {})[r["impl"]] = r
    head = f"{'op':<19}{'batch':>6}{'block':>6}{'density':>8}{'speedup':>9}{'efficiency':>12}{'vs torch BSR':>14}"
    legend = ("speedup: dense ms / numbasparse ms (ideal 1/density); efficiency: speedup x density "
              "(1.00 = dense throughput per live block)")
    lines = [legend, head, "-" * len(head)]
    for (op, batch, block, density), impls in by_case.items():
        ours = impls.get("numbasparse")
        if ours is None:
            continue
        efficiency = ours["speedup_vs_dense"] * density if density > 0 else float("nan")
        bsr = impls.get("torch BSR")
        # each against dense torch of its own rounds: drift between the rounds cancels
        vs_bsr = f"{ours['speedup_vs_dense'] / bsr['speedup_vs_dense']:.2f}x faster" if bsr else "-"
        lines.append(f"{op:<19}{batch or '':>6}{block:>6}{density:>8.2f}{ours['speedup_vs_dense']:>8.2f}x"
                     f"{efficiency:>12.2f}{vs_bsr:>14}")
    return "\n".join(lines)
