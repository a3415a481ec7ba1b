"""examples/small_world_text.py on tiny sizes: the four models train on the stdlib's
source at equal parameter counts and report finite bits per character."""
from __future__ import annotations

import math

import pytest

from helpers import load_example


def _example():
    return load_example("small_world_text")


def test_splits_are_fixed_disjoint_and_real_source():
    example = _example()
    first, second = example.stdlib_splits(), example.stdlib_splits()
    assert first == second
    assert all(len(part) > 10_000 for part in first.values())
    assert b"def " in first["train"] and b"import " in first["test"]
    assert first["train"][:5000] not in first["test"] and first["test"][:5000] not in first["train"]


def test_quick_run_compares_four_models_at_equal_parameters(capsys):
    example = _example()
    results = example.main(["--quick", "--train-bytes", "8192", "--valid-bytes", "2048", "--test-bytes", "2048",
                            "--epochs", "1", "--batch", "8", "--seq", "16"])
    out = capsys.readouterr().out
    assert [r["model"] for r in results] == ["dense", "small-world", "random", "L0"]
    dense = results[0]
    for r in results:
        assert math.isfinite(r["test_bpc"]) and 0.0 < r["test_bpc"] < 8.5   # 8 bits: the uniform guess
        assert r["seconds_per_epoch"] > 0
    for r in results[1:]:
        assert r["width"] == 2 * dense["width"]
        assert r["parameters"] == pytest.approx(dense["parameters"], rel=0.15)
        assert r["density"] == pytest.approx(results[1]["density"])
    assert results[1]["parameters"] == results[2]["parameters"] == results[3]["parameters"]
    assert "test bpc" in out and "Watts-Strogatz" in out


def test_bits_per_char_of_a_uniform_model_is_eight():
    import torch

    example = _example()
    args = example.parse_args(["--quick"])
    model = example.dense_model(args)
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()
    data = torch.randint(0, 256, (33, 4))
    assert example.bits_per_char(model, data, 8) == pytest.approx(8.0, abs=1e-5)
