"""``taskloom worker APP --metrics-port P``: the worker process serves Prometheus
text at http://127.0.0.1:P/metrics, fed by the lifecycle transitions of the
tasks it runs (a MetricsListener on the runtime). Run as a user runs it: a
subprocess on the shared Redis; the scrape is parsed by prometheus_client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime import Runtime
from tests.conftest import REDIS_URL
from tests.dashboard.conftest import purge, redis_up

pytestmark = pytest.mark.redis

ROOT = Path(__file__).parents[2]
WAIT_S = 60   # generous: a worker process starting on a shared, slow machine
LABELS = (("queue", "default"), ("task", "tasks.add"))


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + n > 65535:
            continue
        try:
            for i in range(1, n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", first + i))
        except OSError:
            continue
        return first
    raise RuntimeError("no run of free ports")


@pytest.fixture
def app_dir(tmp_path: Path, namespace: str) -> Path:
    (tmp_path / "metrics_app.py").write_text(textwrap.dedent(f"""
        from runtime import Runtime
        rt = Runtime({REDIS_URL!r}, namespace={namespace!r})

        @rt.task(name="tasks.add")
        async def add(x: int, y: int) -> int:
            return x + y
    """))
    return tmp_path


def command(*args: str, prelude: str = "") -> list[str]:
    code = f"{prelude}from runtime.cli import main; main()"
    return [sys.executable, "-c", code, "worker", "metrics_app:rt", "--heartbeat", "0",
            "--pool-size", "0", "--shutdown-grace", "5", *args]


@pytest.fixture
def spawn(app_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:   # stop only what this test started, by its pid
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start(spawn: list[subprocess.Popen[str]], app_dir: Path, *args: str,
          prelude: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    p = subprocess.Popen(command(*args, prelude=prelude), cwd=app_dir, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    spawn.append(p)
    return p


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int, proc: subprocess.Popen[str]) -> Samples:
    """The parsed /metrics of ``port`` once it answers (the worker is starting)."""
    async with httpx.AsyncClient() as client:
        with anyio.fail_after(WAIT_S):
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    await anyio.sleep(0.1)
                    continue
                assert r.status_code == 200
                return samples(r.text)


async def run_tasks(namespace: str, n: int) -> None:
    rt = Runtime(REDIS_URL, namespace=namespace)

    @rt.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    async with rt:
        handles = [await rt.enqueue(add.s(i, 1)) for i in range(n)]
        with anyio.fail_after(WAIT_S):
            for h in handles:
                await h.result(timeout=WAIT_S)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT_S)
    return proc.returncode, out


async def test_worker_serves_metrics_and_counters_move(app_dir: Path, namespace: str,
                                                       spawn: list[subprocess.Popen[str]]) -> None:
    await redis_up()
    port = free_ports(1)
    proc = start(spawn, app_dir, "--metrics-port", str(port))
    try:
        before = await scrape(port, proc)
        assert before.get(("taskloom_tasks_succeeded_total", LABELS), 0.0) == 0.0
        await run_tasks(namespace, 3)
        with anyio.fail_after(WAIT_S):   # the transition lands just after the result
            while (after := await scrape(port, proc)).get(
                    ("taskloom_tasks_succeeded_total", LABELS), 0.0) < 3:
                await anyio.sleep(0.1)
        assert after[("taskloom_tasks_started_total", LABELS)] >= 3
        assert after[("taskloom_task_run_seconds_count", LABELS)] >= 3
        assert after[("taskloom_tasks_in_flight", LABELS)] == 0
        code, out = stop(proc)
        assert code == 0, out
        assert "Traceback" not in out
    finally:
        await purge(namespace)


@pytest.mark.slow
async def test_the_supervisor_serves_the_sum_of_its_processes(
        app_dir: Path, namespace: str, spawn: list[subprocess.Popen[str]]) -> None:
    """With --processes 2 one port serves the sum over both worker processes
    (tests/dashboard/test_metrics_multiproc.py checks that both ran tasks)."""
    await redis_up()
    port = free_ports(1)
    proc = start(spawn, app_dir, "--processes", "2", "--concurrency", "4",
                 "--metrics-port", str(port))
    try:
        assert (await scrape(port, proc)).get(("taskloom_tasks_succeeded_total", LABELS),
                                              0.0) == 0.0   # answers; nothing run yet
        await run_tasks(namespace, 6)
        with anyio.fail_after(WAIT_S):   # together the two processes ran all six
            while (await scrape(port, proc)).get(("taskloom_tasks_succeeded_total", LABELS),
                                                 0.0) < 6:
                await anyio.sleep(0.1)
        code, out = stop(proc)
        assert code == 0, out
    finally:
        await purge(namespace)


def test_a_taken_port_is_one_line_and_exit_1(app_dir: Path,
                                             spawn: list[subprocess.Popen[str]]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = start(spawn, app_dir, "--metrics-port", str(port))
        out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1, out
    assert "pass a free --metrics-port" in out and "Traceback" not in out


def test_a_missing_dashboard_extra_says_what_to_install(app_dir: Path,
                                                        spawn: list[subprocess.Popen[str]]) -> None:
    hide = "import sys; sys.modules['prometheus_client'] = None; "   # as if not installed
    proc = start(spawn, app_dir, "--metrics-port", str(free_ports(1)), prelude=hide)
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1, out
    assert "pip install 'taskloom[dashboard]'" in out and "Traceback" not in out
