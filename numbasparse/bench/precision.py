"""16-bit rows of the benchmark: BlockSparseLinear with bfloat16 and float16 weights and
activations (float32 accumulation) against the same layer in float32, and against
dense torch in float32 and in the same 16-bit dtype.

The targets these rows measure: at batch 1, where the forward pass streams the weight
blocks once, half the bytes should give well over 1.5x the float32 speed; at batch
256, where the register tiles are the limit, 16-bit must be no slower than float32.
"""
from __future__ import annotations

import torch

from .. import backend, layouts
from ..nn import BlockSparseLinear
from .matmul import training_step
from .timing import interleaved_ms

DTYPES = (torch.bfloat16, torch.float16)
OPS = ("fwd", "bwd", "train step")
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _cases(x, dy, layer):
    layout, bs, w = layer.layout, layer.block_size, layer.weight.detach()
    return {
        "fwd": lambda: backend._forward(x, w, layout, bs),
        "bwd": lambda: backend._backward(dy, x, w, layout, bs),
        "train step": training_step(layer, x, dy),
    }


def _dense_cases(x, dy, weight):
    xg = x.detach().clone().requires_grad_()
    wg = weight.detach().clone().requires_grad_()

    def step():
        xg.grad = wg.grad = None
        torch.nn.functional.linear(xg, wg).backward(dy)

    def backward():
        return dy @ weight, dy.t() @ x

    return {"fwd": lambda: torch.nn.functional.linear(x, weight), "bwd": backward, "train step": step}


def precision_rows(device="cpu", hidden=4096, batches=(1, 256), block=32, densities=(0.1,), repeats=5,
                   dtypes=DTYPES, seed=0, progress=None):
    """Rows ``{op, impl, dtype, batch, hidden, block, density, ms, gflops, dense_ms,
    speedup_vs_dense, speedup_vs_fp32}``: per (batch, density, op), numbasparse in float32
    and in each of ``dtypes`` timed in interleaved rounds, dense torch in float32 and in
    each dtype in rounds of their own.  ``speedup_vs_dense`` is against dense torch float32;
    ``speedup_vs_fp32`` against numbasparse float32 (for dense rows: dense float32)."""
    if device == "cuda":
        dtypes = tuple(d for d in dtypes if d != torch.bfloat16)   # the CUDA kernels take float16 only
    progress = progress or (lambda what: None)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        x32 = torch.randn(batch, hidden, generator=gen).to(device)
        dy32 = torch.randn(batch, hidden, generator=gen).to(device)
        dense32 = torch.randn(hidden, hidden, generator=gen).to(device) / hidden ** 0.5
        for density in densities:
            layout = layouts.random(hidden // block, hidden // block, density, seed=seed)
            live = layout.nnz * block * block
            fns = {}
            for dtype in (torch.float32, *dtypes):
                layer = BlockSparseLinear(hidden, hidden, layout, block, bias=False).to(device=device, dtype=dtype)
                x, dy = x32.to(dtype), dy32.to(dtype)
                ours = _cases(x, dy, layer)
                dense = _dense_cases(x, dy, dense32.to(dtype))
                for op in OPS:
                    fns.setdefault(op, {})[("numbasparse", dtype)] = ours[op]
                    fns[op][("dense torch", dtype)] = dense[op]
            for op in OPS:
                progress(f"{op:<11} batch {batch} block {block} density {density}: float32 and "
                         + ", ".join(_NAMES[d] for d in dtypes))
                # ours and dense torch in rounds of their own (as in the main grid): a dense
                # call streams a 32-64 MB weight and leaves a cold cache to whatever runs next
                ms = interleaved_ms({k: f for k, f in fns[op].items() if k[0] == "numbasparse"}, device, repeats)
                ms.update(interleaved_ms({k: f for k, f in fns[op].items() if k[0] == "dense torch"}, device,
                                         repeats))
                matmuls = {"fwd": 1, "bwd": 2, "train step": 3}[op]
                flops = 2.0 * batch * live * matmuls
                dense_flops = 2.0 * batch * hidden * hidden * matmuls
                for (impl, dtype), t in ms.items():
                    base = ms[(impl, torch.float32)]
                    rows.append({"op": op, "impl": impl, "dtype": _NAMES[dtype], "batch": batch, "hidden": hidden,
                                 "block": block if impl == "numbasparse" else None, "density": density, "ms": t,
                                 "gflops": (flops if impl == "numbasparse" else dense_flops) / (t * 1e6),
                                 "dense_ms": ms[("dense torch", torch.float32)],
                                 "speedup_vs_dense": ms[("dense torch", torch.float32)] / t,
                                 "speedup_vs_fp32": base / t})
    return rows


def format_precision(rows) -> str:
    """Fixed-width table of the 16-bit rows."""
    legend = ("16-bit storage, float32 accumulation.  vs fp32: the same implementation's float32 ms / this "
              "row's ms (same rounds); vs dense fp32: dense torch float32 ms / this row's ms")
    head = (f"{'op':<12}{'impl':<14}{'dtype':>6}{'batch':>6}{'hidden':>7}{'block':>6}{'density':>8}{'ms':>10}"
            f"{'vs fp32':>9}{'vs dense fp32':>15}")
    lines = [legend, head, "-" * len(head)]
    for r in rows:
        block = "-" if r["block"] is None else str(r["block"])
        lines.append(f"{r['op']:<12}{r['impl']:<14}{r['dtype']:>6}{r['batch']:>6}{r['hidden']:>7}{block:>6}"
                     f"{r['density']:>8.2f}{r['ms']:>10.3f}{r['speedup_vs_fp32']:>8.2f}x"
                     f"{r['speedup_vs_dense']:>14.2f}x")
    return "\n".join(lines)
