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


def test_precision_rows_time_16_bit_against_float32():
    from numbasparse.bench.precision import format_precision, precision_rows

    rows = precision_rows("cpu", hidden=64, batches=(2, 17), densities=(0.5,), repeats=1)
    keys = {(r["op"], r["impl"], r["dtype"], r["batch"]) for r in rows}
    for op in ("fwd", "bwd", "train step"):
        for impl in ("numbasparse", "dense torch"):
            for dtype in ("fp32", "bf16", "fp16"):
                assert (op, impl, dtype, 2) in keys and (op, impl, dtype, 17) in keys
    for r in rows:
        assert r["ms"] > 0 and r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
        if r["dtype"] == "fp32":
            assert r["speedup_vs_fp32"] == 1.0
    assert format_precision(rows).count("\n") == len(rows) + 2


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
          "--no-conv", "--no-peers", "--no-lstm", "--no-lsh", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "numbasparse" in printed and "dense torch" in printed
    result = json.loads(out.read_text())
    assert result["info"]["threads"] >= 1
    assert {r["impl"] for r in result["rows"]} == {"numbasparse", "dense torch"}


def test_lstm_rows_time_ours_against_nn_lstm():
    from numbasparse.bench.recurrent import format_lstm, lstm_rows

    rows = lstm_rows("cpu", hidden=64, input_size=48, batch=3, steps=4, block=16, densities=(0.5,), repeats=1)
    assert len(rows) == 6
    assert {r["impl"] for r in rows} == {"numbasparse, dense input", "numbasparse, sparse input", "torch nn.LSTM"}
    assert {r["op"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["ms"] > 0 and r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
        assert (r["density"] is None) == (r["impl"] == "torch nn.LSTM")
    assert format_lstm(rows).count("\n") == len(rows) + 2


def test_lsh_rows_time_ours_against_the_full_softmax():
    from numbasparse.bench.lsh import format_lsh, lsh_rows

    rows = lsh_rows("cpu", vocab=512, hidden=32, batch=8, actives=(2, 1), tables=2, bits=3, repeats=1)
    assert len(rows) == 12
    assert {r["op"] for r in rows} == {"train step", "+ SGD", "+ Adam"}
    for r in rows:
        assert r["ms"] > 0 and r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
    assert sorted({r["active"] for r in rows}) == [32, 64, 512]
    assert format_lsh(rows).count("\n") == len(rows) + 2


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


# --- pruned-model mode (python -m numbasparse.bench --model) ---------------------------------

PRUNED_FIELDS = {"op", "impl", "batch", "hidden", "block", "density", "ms", "dense_ms", "speedup_vs_dense"}


def _tiny_pruned(**kwargs):
    from numbasparse.bench.pruned import pruned_rows

    notes = []
    rows = pruned_rows(hidden=128, batches=(1, 4), block_sizes=(32,), densities=(0.25,), repeats=1, notes=notes,
                       **kwargs)
    return rows, notes


def _check_pruned_rows(rows, impls):
    assert {(r["impl"], r["batch"]) for r in rows} == {(i, b) for i in impls for b in (1, 4)}
    for r in rows:
        assert PRUNED_FIELDS <= set(r)
        assert r["op"] == "pruned MLP inference" and r["hidden"] == 128
        assert r["ms"] > 0 and r["speedup_vs_dense"] > 0
        assert r["speedup_vs_dense"] == pytest.approx(r["dense_ms"] / r["ms"])
        if r["impl"] == "dense torch":
            assert r["block"] is None and r["density"] == 1.0 and r["speedup_vs_dense"] == 1.0
        else:
            assert r["block"] == 32 and r["density"] == 0.25


def test_pruned_rows_skip_absent_peers(monkeypatch, tmp_path):
    import importlib.util
    import sys

    from numbasparse.bench.pruned import format_pruned_table, pruned_rows

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    rows, notes = _tiny_pruned()  # and no --peer-python
    _check_pruned_rows(rows, ("dense torch", "numbasparse"))
    assert any(n.startswith("onnxruntime: skipped") for n in notes)
    assert any(n.startswith("deepsparse: skipped (no --peer-python") for n in notes)
    table = format_pruned_table(rows, notes)
    assert table.count("\n") == len(rows) + 2 + len(notes) and "numbasparse" in table

    # a --peer-python that does not run, and one without deepsparse: a reason each, no error
    for python, reason in ((str(tmp_path / "no-such-python"), "cannot run"),
                           (sys.executable, "import deepsparse failed")):
        if python == sys.executable and importlib.util.find_spec("deepsparse") is not None:
            continue
        notes = []
        rows = pruned_rows(hidden=128, batches=(1,), densities=(0.25,), repeats=1, peer_python=python, notes=notes)
        assert {r["impl"] for r in rows} == {"dense torch", "numbasparse"}
        assert any(n.startswith("deepsparse: skipped") and reason in n for n in notes), notes


def test_pruned_rows_with_onnxruntime():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    rows, notes = _tiny_pruned()
    _check_pruned_rows(rows, ("dense torch", "numbasparse", "onnxruntime"))
    assert any(n.startswith("onnxruntime ") and "intra_op_num_threads" in n for n in notes)


def test_pruned_masked_model_is_the_same_function():
    import torch

    from numbasparse import BlockSparseLinear
    from numbasparse.bench.pruned import check_pruned, prune, pruned_mlp

    dense = pruned_mlp(128)
    sparse, masked = prune(dense, 32, 0.25)
    layers = [m for m in sparse if isinstance(m, BlockSparseLinear)]
    assert len(layers) == 3 and all(m.layout.density == 0.25 for m in layers)
    zeros = (masked[2].weight.reshape(4, 32, 4, 32) == 0).all(3).all(1)
    assert int((~zeros).sum()) == 4  # 16 blocks, a quarter kept
    assert torch.equal(dense[0].bias, masked[0].bias)
    check_pruned(masked, sparse, torch.randn(3, 32))


def test_pruned_check_fails_loudly(monkeypatch):
    import torch

    from numbasparse.bench import pruned

    real_prune = pruned.prune

    def wrong_prune(dense, block, density):
        sparse, masked = real_prune(dense, block, density)
        with torch.no_grad():
            sparse[4].weight[0] += 0.5  # the output layer's live block off
        return sparse, masked

    monkeypatch.setattr(pruned, "prune", wrong_prune)
    with pytest.raises(RuntimeError, match="correctness check failed: numbasparse.*differs"):
        _tiny_pruned(peers=False)

    sparse, masked = real_prune(pruned.pruned_mlp(128), 32, 0.25)
    x = torch.randn(2, 32)
    with pytest.raises(RuntimeError, match="onnxruntime.*differs"):
        pruned.check_pruned(masked, sparse, x, onnx_run=lambda x_np: x_np * 0 + 1.0)
    with pytest.raises(ValueError, match="multiple of 4 x block"):
        pruned.pruned_rows(hidden=96, batches=(1,), block_sizes=(32,), peers=False)


def test_cli_model_mode(tmp_path, capsys, monkeypatch):
    from numbasparse.bench import pruned

    out = tmp_path / "pruned.json"
    main(["--model", "--hidden", "128", "--batch", "1", "4", "--density", "0.25", "--repeats", "1", "--no-peers",
          "--json", str(out)])
    printed = capsys.readouterr().out
    assert "pruned MLP inference" in printed and "peers: skipped (--no-peers)" in printed
    result = json.loads(out.read_text())
    assert {r["impl"] for r in result["rows"]} == {"numbasparse", "dense torch"}
    assert result["notes"] and result["info"]["threads"] >= 1

    calls = []
    monkeypatch.setattr(pruned, "run_pruned",
                        lambda *a, **k: calls.append((a, k)) or {"info": result["info"], "rows": [], "notes": []})
    main(["--model"])
    main(["--model", "--quick"])
    (full, _), (quick, _) = calls
    assert full[:5] == (4096, (1, 64, 256), (32,), (0.1, 0.25), 5)
    assert quick[:5] == (4096, (1, 64), (32,), (0.1,), 3)
    with pytest.raises(SystemExit):
        main(["--model", "--hidden", "100"])
    with pytest.raises(SystemExit):
        main(["--peer-python", "python"])  # only with --model


def test_help_lists_the_model_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--model" in text and "--peer-python" in text and "pruned" in text
