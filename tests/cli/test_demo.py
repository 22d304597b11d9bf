"""`taskloom demo` as a new user runs it: a subprocess on the embedded default."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_pipeline_and_reports_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "demo"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "chain fetch | size -> 34" in out
    assert "chord of 20 fetch|size -> total 690" in out
    assert "report done after 3 attempts" in out
    assert "time limit" in out
    assert "ZeroDivisionError" in out
    assert "sum 499500" in out
    assert "reason=failed" in out and "reason=time_limit" in out
