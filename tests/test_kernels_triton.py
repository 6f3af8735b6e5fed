"""Runs the Triton kernel cases (`kernels_triton_cases.py`) under the Triton interpreter on CPU.

`TRITON_INTERPRET=1` only takes effect if it is set before Triton is first imported, and it must
not leak into other test modules, so the cases run in a fresh Python process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("kernels_triton_cases.py")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_triton_kernels_match_references_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", str(CASES), "-q", "-p", "no:cacheprovider",
                          "-p", "no:randomly", "-o", "addopts="], cwd=CASES.parent.parent, env=env,
                         capture_output=True, text=True, timeout=590)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], report
