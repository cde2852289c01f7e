"""The three examples in examples/ run to completion (short settings: the full runs take under a minute each)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args,expect", [
    ("cnn_batchnorm.py", ["30", "2"], "learned L2 strengths"),
    ("unroll_meta_loop.py", ["60", "2"], "learned lr at the knots"),
    ("numpy_callbacks.py", ["40", "2"], "learned L2 per pixel"),
])
def test_example_runs(script, args, expect):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout
    assert "meta-iteration 1:" in out.stdout
