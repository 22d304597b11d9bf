"""The CI rule of tests/conftest.py: in CI a skip is a failure unless allow-listed;
locally skips are printed (``-rs``); an xfail is not a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import pytest

def test_skips() -> None:
    pytest.skip("probe skip")

@pytest.mark.xfail(strict=True, reason="probe xfail")
def test_xfails() -> None:
    raise AssertionError
'''


def run_probe(tmp_path: Path, ci: str | None, *only: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
            "-p", "tests.conftest", "--rootdir", str(tmp_path), "-c", os.devnull,
            *(f"{tmp_path / 'test_probe.py'}::{name}" for name in only)]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_in_ci_a_skip_is_a_failure_that_says_why(tmp_path: Path) -> None:
    done = run_probe(tmp_path, "true", "test_skips")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "skipped in CI (Skipped: probe skip)" in done.stdout
    assert "tests/skips_allowed.toml" in done.stdout


def test_outside_ci_a_skip_is_printed(tmp_path: Path) -> None:
    done = run_probe(tmp_path, None, "test_skips")
    assert done.returncode == pytest.ExitCode.OK, done.stdout
    assert "SKIPPED [1]" in done.stdout and "probe skip" in done.stdout


def test_in_ci_an_xfail_is_not_a_skip(tmp_path: Path) -> None:
    done = run_probe(tmp_path, "true", "test_xfails")
    assert done.returncode == pytest.ExitCode.OK, done.stdout
    assert "1 xfailed" in done.stdout
