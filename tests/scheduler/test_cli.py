"""The scheduler as a user runs it: ``taskloom worker APP --scheduler`` and
``taskloom schedules APP [pause NAME]``, as subprocesses on the shared Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from runtime.ops.scheduler import every, schedules_for
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

APP = "tests.scheduler.cli_app:rt"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ, SCHED_REDIS=REDIS_URL, SCHED_NS=f"sc{uuid.uuid4().hex[:8]}",
               SCHED_LEDGER=str(tmp_path / "runs.txt"), COLUMNS="200")
    yield env


def _taskloom(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], env=env, text=True,
                          capture_output=True, timeout=60, check=False)


def _runs(env: dict[str, str]) -> list[str]:
    path = Path(env["SCHED_LEDGER"])
    return path.read_text().split() if path.exists() else []


async def _wait_runs(env: dict[str, str], count: int, timeout: float) -> list[str]:
    with anyio.fail_after(timeout):
        while len(_runs(env)) < count:
            await anyio.sleep(0.1)  # polling a file outside the system under test
    return _runs(env)


async def test_a_worker_with_scheduler_runs_a_schedule_added_at_run_time_and_cli_pauses_it(
        env: dict[str, str]) -> None:
    os.environ.update({k: env[k] for k in ("SCHED_REDIS", "SCHED_NS", "SCHED_LEDGER")})
    from tests.scheduler.cli_app import rt

    async with rt:
        await schedules_for(rt).add("beat-every-second", rt.signature("sched_cli.beat", "b"),
                                    every(1))
    worker = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "worker", APP, "--scheduler", "--heartbeat", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # generous: the worker starts a fresh interpreter, then ticks once a second
        await _wait_runs(env, 2, timeout=40)
        listed = _taskloom(env, "schedules", APP)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "beat-every-second" in listed.stdout
        assert "every 0:00:01" in listed.stdout
        paused = _taskloom(env, "schedules", APP, "pause", "beat-every-second")
        assert paused.returncode == 0, paused.stdout + paused.stderr
        assert "paused beat-every-second" in paused.stdout
        after_pause = len(_runs(env))
        # a tick already claimed may still run once; then nothing more for 3 s of ticks
        await anyio.sleep(1.5)
        settled = len(_runs(env))
        assert settled <= after_pause + 1
        await anyio.sleep(3)
        assert len(_runs(env)) == settled
        listed = _taskloom(env, "schedules", APP, "--json")
        assert '"paused":true' in listed.stdout
        assert '"last_outcome":"SUCCESS"' in listed.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out


def test_pausing_a_schedule_that_does_not_exist_is_one_line_and_exit_1(
        env: dict[str, str]) -> None:
    done = _taskloom(env, "schedules", APP, "pause", "no-such-schedule")
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "no-such-schedule" in done.stdout + done.stderr


def test_pause_without_a_name_is_a_usage_error(env: dict[str, str]) -> None:
    done = _taskloom(env, "schedules", APP, "pause")
    assert done.returncode == 2
    assert "needs the schedule's NAME" in done.stdout + done.stderr


def test_a_scheduler_on_the_memory_broker_is_refused(tmp_path: Path) -> None:
    app = tmp_path / "memapp.py"
    app.write_text("from runtime import Runtime\nrt = Runtime()\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}")
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "scheduler", "memapp:rt"], env=env,
                          text=True, capture_output=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "redis" in (done.stdout + done.stderr).lower()
