"""``numbasparse.learn`` is the ``learn`` package; it still works where a user's own
``learn.py`` shadows the name."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import learn
import numbasparse


def test_both_names_give_the_same_modules():
    import numbasparse.learn as alias
    import numbasparse.learn.dynamic as dynamic
    from numbasparse.learn import L0BlockSparseLinear

    assert alias is learn and numbasparse.learn is learn
    assert dynamic is learn.dynamic and L0BlockSparseLinear is learn.L0BlockSparseLinear


def test_a_users_learn_py_does_not_shadow_it(tmp_path):
    (tmp_path / "learn.py").write_text("VALUE = 42\n")
    script = textwrap.dedent("""
        import learn as mine
        from numbasparse import learn
        layer = learn.L0BlockSparseLinear(16, 16, block_size=8, seed=0)
        assert learn.gated_layers(layer)[0][1] is layer
        assert mine.VALUE == 42 and learn is not mine
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
