"""LSTM rows of the benchmark: :class:`~numbasparse.BlockSparseLSTM` against
``torch.nn.LSTM`` of the same width, forward and forward+backward over a sequence.

Two input projections for ours: dense (``nn.Linear``, the same cost as in
``nn.LSTM``, so it bounds the speedup) and block-sparse at the recurrent density (the
whole layer sparse, as a sparse-wide model uses it).  The target: hidden 1024, batch
32, 64 steps, recurrent density 0.25, forward+backward at least 2x faster than
``nn.LSTM``.
"""
from __future__ import annotations

import torch

from .. import layouts
from ..nn_lstm import BlockSparseLSTM
from .timing import interleaved_ms

OPS = ("fwd", "fwd+bwd")


def _runner(model, x, op):
    if op == "fwd":
        def forward():
            with torch.no_grad():
                model(x)
        return forward

    def train():
        x.grad = None
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(x)
        out.sum().backward()
    return train


def lstm_rows(device="cpu", hidden=1024, input_size=None, batch=32, steps=64, block=32, densities=(0.25,),
              repeats=5, seed=0, progress=None):
    """Rows ``{op, impl, input, hidden, input_size, batch, steps, block, density, ms,
    dense_ms, speedup_vs_dense}``: per density and op, ours with a dense and with a
    block-sparse input projection and ``nn.LSTM`` timed in interleaved rounds."""
    progress = progress or (lambda what: None)
    input_size = hidden if input_size is None else input_size
    torch.manual_seed(seed)
    x = torch.randn(steps, batch, input_size, device=device, requires_grad=True)
    dense = torch.nn.LSTM(input_size, hidden).to(device)
    rows = []
    for density in densities:
        hidden_blocks = hidden // block
        recurrent = layouts.random(hidden_blocks, 4 * hidden_blocks, density, seed=seed)
        input_layout = layouts.random(input_size // block, 4 * hidden_blocks, density, seed=seed + 1)
        models = {"numbasparse, dense input": BlockSparseLSTM(input_size, hidden, recurrent, block).to(device),
                  "numbasparse, sparse input": BlockSparseLSTM(input_size, hidden, recurrent, block,
                                                               input_layout=input_layout).to(device),
                  "torch nn.LSTM": dense}
        for op in OPS:
            progress(f"LSTM {op:<8} hidden {hidden} batch {batch} steps {steps} density {density}")
            ms = interleaved_ms({name: _runner(m, x, op) for name, m in models.items()}, device, repeats)
            for name, t in ms.items():
                rows.append({"op": op, "impl": name, "hidden": hidden, "input_size": input_size, "batch": batch,
                             "steps": steps, "block": None if name.startswith("torch") else block,
                             "density": None if name.startswith("torch") else density, "ms": t,
                             "dense_ms": ms["torch nn.LSTM"], "speedup_vs_dense": ms["torch nn.LSTM"] / t})
    return rows


def format_lstm(rows) -> str:
    """Fixed-width table of the LSTM rows."""
    legend = ("LSTM over a sequence (one layer); vs nn.LSTM: torch.nn.LSTM's ms / this row's ms (same rounds); "
              "density: the recurrent weight's (and the sparse input projection's)")
    head = (f"{'op':<9}{'impl':<28}{'input':>6}{'hidden':>7}{'batch':>6}{'steps':>6}{'block':>6}{'density':>8}"
            f"{'ms':>10}{'vs nn.LSTM':>12}")
    lines = [legend, head, "-" * len(head)]
    for r in rows:
        block = "-" if r["block"] is None else str(r["block"])
        density = "-" if r["density"] is None else f"{r['density']:.2f}"
        lines.append(f"{r['op']:<9}{r['impl']:<28}{r['input_size']:>6}{r['hidden']:>7}{r['batch']:>6}"
                     f"{r['steps']:>6}{block:>6}{density:>8}{r['ms']:>10.2f}{r['speedup_vs_dense']:>11.2f}x")
    return "\n".join(lines)
