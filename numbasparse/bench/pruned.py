"""Pruned-model rows of the benchmark (``python -m numbasparse.bench --model``): a dense
MLP pruned to block density d, served by numbasparse and by inference engines that run
a pruned dense model, against the unpruned model in dense PyTorch.

* The model: ``hidden/4 -> hidden -> hidden -> hidden/4`` (ReLU between), float32,
  default ``1024 -> 4096 -> 4096 -> 1024``.
* Pruning: each ``nn.Linear`` keeps the ``B x B`` blocks of largest norm, a fraction
  ``d`` of them (``BlockSparseLinear.from_dense(linear, B, density=d)``).  The masked
  dense model is the same ``nn.Linear`` layers with the pruned blocks zeroed: the same
  function as the block-sparse one, which is checked before timing.
* Timed under ``torch.inference_mode()`` per batch, in interleaved rounds: dense torch
  (the unpruned model), numbasparse (the block-sparse model), and, where available,
  onnxruntime (the masked dense model exported with ``torch.onnx.export``; the thread
  count as ``intra_op_num_threads``, spin-waiting off so that its idle threads do not
  take cores from the next call of the round).
* DeepSparse needs numpy<2 and so another environment: ``peer_python`` names its
  interpreter, which runs ``peer_worker.py`` (no numbasparse import) on the same ONNX
  file as a subprocess between the bench's rounds.  Its times come from its own
  process; its speedup is against dense torch of the bench's rounds at the same batch,
  block and density, just before (``own_process`` is True on those rows).
"""
from __future__ import annotations

import copy
import math
import os
import statistics
import subprocess
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from ..nn import BlockSparseLinear
from .layers import _looped
from .timing import Progress, interleaved_ms, median_ms

__all__ = ["OP", "pruned_mlp", "prune", "check_pruned", "pruned_rows", "run_pruned", "format_pruned_table"]

OP = "pruned MLP inference"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_worker.py")
ONNX_OPSET = 17  # what the legacy exporter and DeepSparse 1.8 both handle
IMPL_ORDER = ("dense torch", "numbasparse", "onnxruntime", "deepsparse")


class PeerUnavailable(Exception):
    """A peer cannot run here; the message is the one-line reason."""


def _row(impl, batch, hidden, block, density, ms, dense_ms, flops, own_process=False):
    return {"op": OP, "impl": impl, "batch": batch, "hidden": hidden, "block": block, "density": density,
            "ms": ms, "gflops": flops / (ms * 1e6), "dense_ms": dense_ms, "speedup_vs_dense": dense_ms / ms,
            "own_process": own_process}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def pruned_mlp(hidden: int = 4096, seed: int = 0) -> nn.Sequential:
    """The dense float32 MLP ``hidden/4 -> hidden -> hidden -> hidden/4``, ReLU between."""
    edge = hidden // 4
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(edge, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, edge)).eval()


def prune(dense: nn.Module, block: int, density: float):
    """``(block_sparse, masked_dense)``: each ``nn.Linear`` of ``dense`` pruned to its
    ``density`` fraction of largest-norm ``block x block`` blocks, as a
    BlockSparseLinear and as an ``nn.Linear`` with the pruned blocks zeroed."""
    sparse, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    for name, layer in dense.named_children():
        if isinstance(layer, nn.Linear):
            ours = BlockSparseLinear.from_dense(layer, block, density=density)
            sparse._modules[name] = ours
            with torch.no_grad():
                masked._modules[name].weight.copy_(ours.to_dense().t())
    return sparse.eval(), masked.eval()


def _live_flops(model: nn.Module) -> float:
    """Multiply-adds x 2 per input row over live blocks (all weights of dense layers)."""
    total = 0.0
    for layer in model.modules():
        if isinstance(layer, BlockSparseLinear):
            total += 2.0 * layer.layout.nnz * layer.block_size ** 2
        elif isinstance(layer, nn.Linear):
            total += 2.0 * layer.in_features * layer.out_features
    return total


def _mismatch(got, want, what: str):
    """None if ``got`` equals ``want`` to float32 tolerances, else a message."""
    got, want = torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32)
    if got.shape != want.shape:
        return f"{what}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    scale = float(want.abs().max()) if want.numel() else 0.0
    atol = 1e-4 * max(scale, 1e-3)
    if torch.allclose(got, want, rtol=1e-4, atol=atol):
        return None
    diff = float((got - want).abs().max())
    return (f"{what}: output differs from the masked dense model (max abs diff {diff:.3g}, "
            f"allowed {atol:.3g} + 1e-4 x |value|, largest |value| {scale:.3g})")


def check_pruned(masked: nn.Module, sparse: nn.Module, x: torch.Tensor, onnx_run=None, label: str = "") -> None:
    """Raise RuntimeError unless the block-sparse model (and ``onnx_run(x_numpy)`` if
    given) computes the masked dense model's output on ``x``."""
    with torch.inference_mode():
        want = masked(x)
        problems = [_mismatch(sparse(x), want, f"numbasparse{label}")]
        if onnx_run is not None:
            problems.append(_mismatch(onnx_run(x.numpy()), want, f"onnxruntime{label}"))
    problems = [p for p in problems if p]
    if problems:
        raise RuntimeError("pruned MLP correctness check failed: " + "; ".join(problems))


def export_onnx(model: nn.Module, in_features: int, path: str) -> str:
    """Export ``model`` with a free batch dimension (input ``x``, output ``y``) to
    ``path``; returns which exporter did it.  Raises PeerUnavailable with the reason."""
    x = torch.zeros(2, in_features)  # not 1: torch.export would specialize the batch dimension to it
    names = {"input_names": ["x"], "output_names": ["y"]}
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter: needs only the onnx package
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=ONNX_OPSET,
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, **names)
            return f"torch.onnx.export (TorchScript exporter, opset {ONNX_OPSET})"
        except Exception as exc:  # missing package, or an exporter torch no longer has
            errors.append(_one_line(exc))
        try:  # the torch.export-based exporter: needs onnxscript too
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                              dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1)}}, **names)
            return "torch.onnx.export (torch.export-based exporter)"
        except Exception as exc:
            errors.append(_one_line(exc))
    raise PeerUnavailable("torch.onnx.export failed (" + "; ".join(dict.fromkeys(errors)) +
                          "): pip install 'numbasparse[bench-peers]'")


def _ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["NM_DISABLE_ANALYTICS"] = "1"
    return env


def _run_worker(peer_python: str, args: list, timeout: float) -> dict:
    import json

    try:
        done = subprocess.run([peer_python, WORKER, *args], capture_output=True, text=True, timeout=timeout,
                              env=_worker_env())
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerUnavailable(f"cannot run {peer_python}: {_one_line(exc)}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerUnavailable(f"{peer_python} {os.path.basename(WORKER)} exited {done.returncode}: {tail}")
    result = json.loads(lines[-1])
    if "error" in result:
        raise PeerUnavailable(result["error"])
    return result


def probe_deepsparse(peer_python: str | None) -> dict:
    """The worker's probe answer, or PeerUnavailable with the reason."""
    if not peer_python:
        raise PeerUnavailable("no --peer-python: it needs numpy<2, so it runs from another environment's "
                              "interpreter (e.g. a venv with deepsparse==1.8.0 \"numpy<2\" \"onnx<1.16\")")
    return _run_worker(peer_python, ["--probe"], timeout=120)


def _calls_per_sample(fns: dict, target_ms: float = 2.0, cap: int = 100) -> int:
    """Calls per timed sample so that the fastest function's sample takes ~target_ms."""
    fastest = min(median_ms(fn, repeats=3, warmup=1) for fn in fns.values())
    return max(1, min(cap, math.ceil(target_ms / max(fastest, 1e-3))))


def pruned_rows(hidden=4096, batches=(1, 64, 256), block_sizes=(32,), densities=(0.1, 0.25), repeats=5,
                threads=None, peers=True, peer_python=None, notes=None, progress=None, seed=0):
    """Rows of the pruned-MLP mode (see the module doc); ``notes`` (a list) receives a
    line per peer: what ran and how, or why it was skipped."""
    from . import set_threads

    for block in block_sizes:
        if hidden % (4 * block):
            raise ValueError(f"hidden={hidden} must be a multiple of 4 x block = {4 * block} "
                             f"(in and out are hidden/4 = {hidden / 4:g})")
    threads = set_threads(threads)
    notes = [] if notes is None else notes
    progress = progress or (lambda what: None)
    edge = hidden // 4

    ort_ok = ds_info = None
    if peers:
        try:
            import onnxruntime

            ort_ok = onnxruntime.__version__
        except ImportError as exc:
            notes.append(f"onnxruntime: skipped ({_one_line(exc)}; pip install 'numbasparse[bench-peers]')")
        try:
            ds_info = probe_deepsparse(peer_python)
        except PeerUnavailable as exc:
            notes.append(f"deepsparse: skipped ({exc})")
    else:
        notes.append("peers: skipped (--no-peers)")
    if not ds_info and isinstance(progress, Progress):  # no DeepSparse steps after all
        progress.total = len(block_sizes) * len(densities) * len(batches)

    dense = pruned_mlp(hidden, seed)
    dense_flops = _live_flops(dense)
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn(b, edge, generator=gen) for b in batches}
    x_check = torch.randn(max(batches), edge, generator=gen)
    rows, dense_samples, exported_by = [], {b: [] for b in batches}, None
    with tempfile.TemporaryDirectory(prefix="numbasparse-pruned-") as tmp:
        for block in block_sizes:
            for density in densities:
                sparse, masked = prune(dense, block, density)
                live = _live_flops(sparse)
                label = f" (block {block}, density {density})"
                ort_run = path = None
                if ort_ok or ds_info:
                    path = os.path.join(tmp, f"mlp_b{block}_d{density}.onnx")
                    try:
                        exported_by = export_onnx(masked, edge, path)
                    except PeerUnavailable as exc:
                        which = ", ".join(name for name, ok in (("onnxruntime", ort_ok), ("deepsparse", ds_info)) if ok)
                        notes.append(f"{which}: skipped ({exc})")
                        ort_ok = ds_info = path = None
                if ort_ok:
                    ort_run = _ort_session(path, threads)
                check_pruned(masked, sparse, x_check, ort_run, label)
                group = {}
                for b in batches:
                    x = inputs[b]
                    fns = {"dense torch": lambda x=x: dense(x), "numbasparse": lambda x=x: sparse(x)}
                    if ort_run is not None:
                        x_np = x.numpy()
                        fns["onnxruntime"] = lambda x_np=x_np: ort_run(x_np)
                    progress(f"pruned MLP hidden {hidden} batch {b} block {block} density {density}: "
                             + ", ".join(fns))
                    with torch.inference_mode():
                        calls = _calls_per_sample(fns)
                        ms = interleaved_ms({k: _looped(f, calls) for k, f in fns.items()}, "cpu", repeats)
                    ms = {impl: t / calls for impl, t in ms.items()}
                    group[b] = ms["dense torch"]
                    dense_samples[b].append(ms["dense torch"])
                    for impl, t in ms.items():
                        if impl != "dense torch":
                            rows.append(_row(impl, b, hidden, block, density, t, ms["dense torch"], b * live))
                if ds_info:
                    progress(f"pruned MLP hidden {hidden} block {block} density {density}: "
                             f"deepsparse (own process), batches {' '.join(map(str, batches))}")
                    x_path, y_path = os.path.join(tmp, "check_x.npy"), os.path.join(tmp, "check_y.npy")
                    with torch.inference_mode():
                        want = masked(x_check)
                    np.save(x_path, x_check.numpy())
                    np.save(y_path, want.numpy())
                    try:
                        result = _run_worker(peer_python, ["--onnx", path, "--batch", *map(str, batches),
                                                           "--threads", str(threads), "--repeats", str(repeats),
                                                           "--seed", str(seed), "--check-input", x_path,
                                                           "--check-output", y_path], timeout=1800)
                    except PeerUnavailable as exc:
                        notes.append(f"deepsparse: skipped ({exc})")
                        ds_info = None
                        continue
                    for b in batches:
                        diff = result["max_abs_diff"][str(b)]
                        scale = float(want[:b].abs().max())
                        if not diff <= 1e-4 * max(scale, 1e-3) + 1e-4 * scale:
                            raise RuntimeError(f"pruned MLP correctness check failed: deepsparse{label} batch {b}: "
                                               f"output differs from the masked dense model (max abs diff "
                                               f"{diff:.3g}, largest |value| {scale:.3g})")
                        rows.append(_row("deepsparse", b, hidden, block, density, result["ms"][str(b)], group[b],
                                         b * live, own_process=True))
    for b in batches:
        median = statistics.median(dense_samples[b])
        rows.append(_row("dense torch", b, hidden, None, 1.0, median, median, b * dense_flops))
    if ort_ok:
        notes.append(f"onnxruntime {ort_ok}: masked dense model via {exported_by}, intra_op_num_threads={threads}, "
                     "spin-waiting off; same rounds as dense torch")
    if ds_info:
        notes.append(f"deepsparse {ds_info.get('version')} (numpy {ds_info.get('numpy')}): timed in its own process "
                     f"({peer_python} peer_worker.py, num_cores={threads}, same ONNX file); its speedup is against "
                     "dense torch from this run's rounds at the same batch, block and density, not the same rounds")
    order = {impl: i for i, impl in enumerate(IMPL_ORDER)}
    rows.sort(key=lambda r: (r["batch"], r["block"] or 0, -r["density"], order.get(r["impl"], len(order))))
    return rows


def run_pruned(hidden=4096, batches=(1, 64, 256), block_sizes=(32,), densities=(0.1, 0.25), repeats=5,
               threads=None, peers=True, peer_python=None, show_progress=True, seed=0):
    """The pruned-MLP mode; returns ``{"info": machine_info, "rows": [...], "notes": [...]}``."""
    from . import machine_info

    # one step per (block, density, batch), and one per (block, density) for DeepSparse
    steps = len(block_sizes) * len(densities) * (len(batches) + (1 if peers and peer_python else 0))
    progress = Progress(steps, enabled=show_progress)
    notes = []
    try:
        rows = pruned_rows(hidden, tuple(batches), tuple(block_sizes), tuple(densities), repeats, threads, peers,
                           peer_python, notes=notes, progress=progress, seed=seed)
    finally:
        progress.close()
    return {"info": machine_info("cpu"), "rows": rows, "notes": notes}


def format_pruned_table(rows, notes=()) -> str:
    """Fixed-width text table of pruned-model rows, then the notes (one line each)."""
    head = (f"{'op':<22}{'impl':<13}{'batch':>6}{'hidden':>7}{'block':>6}{'density':>8}{'ms':>10}"
            f"{'dense ms':>10}{'GFLOP/s':>9}{'speedup':>9}")
    legend = ("speedup = dense torch ms (unpruned model) / this row's ms, same rounds (* timed in its own process: "
              "against dense torch of this run at the same batch); GFLOP/s counts live blocks only")
    lines = [legend, head, "-" * len(head)]
    for r in rows:
        block = "-" if r.get("block") is None else str(r["block"])
        impl = r["impl"] + ("*" if r.get("own_process") else "")
        lines.append(f"{r['op']:<22}{impl:<13}{r['batch']:>6}{r['hidden']:>7}{block:>6}{r['density']:>8.2f}"
                     f"{r['ms']:>10.3f}{r['dense_ms']:>10.3f}{r['gflops']:>9.1f}{r['speedup_vs_dense']:>8.2f}x")
    lines += [f"# {note}" for note in notes]
    return "\n".join(lines)
