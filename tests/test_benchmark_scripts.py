"""Every committed benchmark script imports against the current library and parses its options.

The benchmarks themselves take minutes to hours and are not run in the tests; this catches a script left
behind by an API change (its ``--help`` must exit 0)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import BENCHMARKS  # noqa: E402


@pytest.mark.parametrize("name", BENCHMARKS + ["run_all"])
def test_benchmark_script_imports_and_parses_its_options(name):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
