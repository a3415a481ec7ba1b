"""examples/prune_for_cpu.py in its --quick mode: converts, prunes to the asked density,
times both models and exports the pruned one."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest


def test_prune_for_cpu_quick(capsys):
    pytest.importorskip("sklearn")
    path = Path(__file__).resolve().parents[1] / "examples" / "prune_for_cpu.py"
    spec = importlib.util.spec_from_file_location("prune_for_cpu_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--quick", "--hidden", "256", "--density", "0.25"])
    out = capsys.readouterr().out
    assert "skipped: out_features=10" in out
    density = float(re.search(r"block density (\d\.\d+) of the converted layers", out).group(1))
    assert density == pytest.approx(0.25, abs=0.02)
    assert re.search(r"^\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M)
    assert re.search(r"^\s+64\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M)
    assert "exported outputs match" in out
