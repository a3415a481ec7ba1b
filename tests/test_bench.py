"""The benchmark runs end to end on a tiny grid and reports consistent rows."""
import json
from types import SimpleNamespace

import pytest

from numbasparse.bench import format_table, matmul_rows
from numbasparse.bench.__main__ import main
from numbasparse.bench.timing import median_ms


def test_matmul_rows_cover_every_impl_and_op():
    rows = matmul_rows("cpu", hidden=64, batches=(3,), block_sizes=(8,), densities=(0.5, 0.25), repeats=1)
    impls = {(r["impl"], r["op"]) for r in rows}
    for op in ("fwd", "bwd-data", "bwd-weight", "train step"):
        assert ("dense torch", op) in impls
        assert ("numbasparse", op) in impls
        assert ("masked dense", op) in impls
    assert ("torch BSR", "fwd") in impls
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0 and r["speedup_vs_dense"] > 0
    for r in rows:
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
    dense_rows = [r for r in rows if r["impl"] == "dense torch"]
    assert len(dense_rows) == 4 and all(r["speedup_vs_dense"] == 1.0 for r in dense_rows)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 2
    assert "numbasparse" in table and "speedup" in table


def test_median_ms_takes_the_median(monkeypatch):
    import numbasparse.bench.timing as timing

    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # runs of 5 ms, 1 ms, 3 ms
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert median_ms(lambda: calls.append(1), repeats=3, warmup=1) == pytest.approx(3.0)
    assert len(calls) == 4  # one warm-up and three timed runs


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--hidden", "64", "--batch", "2", "--block", "16", "--density", "0.5", "--repeats", "1",
          "--no-conv", "--no-peers", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "numbasparse" in printed and "dense torch" in printed
    result = json.loads(out.read_text())
    assert result["info"]["threads"] >= 1
    assert {r["impl"] for r in result["rows"]} == {"numbasparse", "dense torch"}


def test_microkernel_ceiling_is_timed():
    from numbasparse.bench.microkernel import format_microkernel, microkernel_gflops
    from numbasparse.kernels.cpu import VECTOR_BYTES

    result = microkernel_gflops(block_sizes=(32, 16), seconds=0.01)
    assert all(g > 0 for g in result.values())
    if VECTOR_BYTES == 64:
        assert set(result) == {32, 16}
    assert "GFLOP/s" in format_microkernel(result)


def test_overhead_and_model_rows():
    from numbasparse.bench import format_summary, model_rows, overhead_rows

    rows = overhead_rows(repeats=1) + model_rows(repeats=1, hidden=64, block=16, densities=(0.5,), batch=4)
    ops = {(r["op"], r["impl"]) for r in rows}
    for op in ("layer fwd", "layer train step", "model train step", "model fwd"):
        assert (op, "numbasparse") in ops and (op, "dense torch") in ops
    for r in rows:
        assert r["ms"] > 0 and r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
    summary = format_summary(rows)
    assert "efficiency" in summary and "layer train step" in summary


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    import re
    options = re.findall(r"^  (--[a-z-]+)", text, flags=re.M)
    assert len(options) >= 15
    for block in re.split(r"\n  (?=--)", text.split("options:")[1])[1:]:
        assert len(block.split()) > 2, f"option without help text: {block!r}"
