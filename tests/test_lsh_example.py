"""examples/lsh_next_word.py on tiny sizes: the stdlib's tokens, a 20k+ vocabulary
available, and both models trained for equal time and scored with the full softmax."""
from __future__ import annotations

import math

from helpers import load_example


def _example():
    return load_example("lsh_next_word")


def test_tokens_split_by_file_and_vocabulary_size():
    example = _example()
    splits = example.stdlib_tokens()
    assert all(len(tokens) > 10_000 for tokens in splits.values())
    assert len(set(splits["train"])) >= 20_000          # the study's vocabulary of 32768 is not padded
    assert b"def" in set(splits["test"]) and b"(" in set(splits["train"])
    index = {b"def": 0, b"(": 1}
    ids = example.encode([b"def", b"x", b"("], index)
    assert ids.tolist() == [0, 2, 1]                     # unknown tokens map to <unk> = len(index)
    x, y = example.windows(ids, 2)
    assert x.tolist() == [[0, 2]] and y.tolist() == [1]


def test_quick_run_trains_both_models_for_equal_time(capsys):
    example = _example()
    results = example.main(["--quick", "--seconds", "1.5", "--train-tokens", "3000", "--eval-tokens", "500",
                            "--vocab", "1024", "--hidden", "64"])
    out = capsys.readouterr().out
    assert [r["model"] for r in results] == ["full", "lsh"]
    for r in results:
        assert r["steps"] > 0 and math.isfinite(r["perplexity"]) and 0 <= r["accuracy"] <= 100
        assert r["perplexity"] < 1024 * 4            # trained at least a little (uniform: 1024)
    lsh = results[1]
    assert 0 <= lsh["top_block"] <= 1 and 0 <= lsh["label_block"] <= 1 and lsh["chance"] == 8 / 32
    assert "top-block recall" in out and "perplexity" in out
