"""``taskloom worker APP --processes 2 --metrics-port P``: one scrape of P shows
the sum over both worker processes (prometheus-client's multiprocess mode, the
supervisor serving a MultiProcessCollector); a child killed and replaced keeps
its counters in the sum and its live gauges leave it (mark_process_dead); the
directory goes when the supervisor stops. Run as a user runs it: a subprocess
on the shared Redis; the scrape parsed by prometheus_client.parser."""

from __future__ import annotations

import os
import signal
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
from tests.dashboard.test_browser import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
WAIT_S = 60   # generous: two worker processes starting on a shared, slow machine

APP = """
    import os
    import redis.asyncio as aioredis
    from runtime import Runtime

    rt = Runtime({url!r}, namespace={ns!r})

    @rt.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(name="tasks.meet")
    async def meet(key: str) -> int:
        # returns only once two of these run at the same time: with --concurrency 1
        # --prefetch 1 that is one in each worker process
        r = aioredis.Redis.from_url({url!r})
        try:
            if await r.incr(key) == 2:
                await r.rpush(key + ":go", "1", "1")
            await r.blpop([key + ":go"], timeout=120)
            return os.getpid()
        finally:
            await r.aclose()
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def supervisor(tmp_path: Path, namespace: str) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    (tmp_path / "mp_app.py").write_text(textwrap.dedent(APP.format(url=REDIS_URL, ns=namespace)))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "TMPDIR": str(tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "runtime.cli", "worker", "mp_app:rt", "--processes", "2",
           "--concurrency", "1", "--prefetch", "1", "--heartbeat", "0", "--pool-size", "0",
           "--shutdown-grace", "5", "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        yield proc, port, tmp
    finally:   # stop only what this test started, by its pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def scrape(port: int, proc: subprocess.Popen[str]) -> Samples:
    """One parsed scrape of ``port`` once it answers (the supervisor is starting)."""
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
                out: Samples = {}
                for family in text_string_to_metric_families(r.text):
                    for s in family.samples:
                        out[(s.name, tuple(sorted(s.labels.items())))] = s.value
                return out


def total(samples: Samples, name: str, task: str | None = None) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and (task is None or ("task", task) in labels))


async def test_one_port_shows_the_sum_over_the_worker_processes(
        supervisor: tuple[subprocess.Popen[str], int, Path], namespace: str) -> None:
    await redis_up()
    proc, port, tmp = supervisor
    try:
        assert total(await scrape(port, proc), "taskloom_tasks_succeeded_total") == 0
        rt = Runtime(REDIS_URL, namespace=namespace)
        meet = rt.task(name="tasks.meet")(_meet_stub)
        add = rt.task(name="tasks.add")(_add_stub)
        key = f"{namespace}:meet"
        async with rt:
            handles = [await rt.enqueue(meet.s(key)) for _ in range(2)]
            handles += [await rt.enqueue(add.s(i, 1)) for i in range(4)]
            with anyio.fail_after(WAIT_S):
                results = [await h.result(timeout=WAIT_S) for h in handles]
        pids = {int(results[0]), int(results[1])}
        assert len(pids) == 2   # both worker processes ran tasks
        with anyio.fail_after(WAIT_S):   # a transition lands just after its result
            while total(got := await scrape(port, proc), "taskloom_tasks_succeeded_total") < 6:
                await anyio.sleep(0.1)
        assert total(got, "taskloom_tasks_succeeded_total") == 6
        assert total(got, "taskloom_tasks_succeeded_total", "tasks.meet") == 2
        assert total(got, "taskloom_tasks_started_total") == 6
        assert total(got, "taskloom_task_run_seconds_count") == 6
        assert total(got, "taskloom_tasks_in_flight") == 0
        # one worker process killed: the supervisor replaces it; its counters stay in
        # the sum, its live gauges (in-flight) are dropped from the directory
        (mp_dir,) = tmp.glob("taskloom-metrics-*")
        gone = min(pids)
        assert (mp_dir / f"gauge_livesum_{gone}.db").exists()
        os.kill(gone, signal.SIGKILL)
        with anyio.fail_after(WAIT_S):
            while (mp_dir / f"gauge_livesum_{gone}.db").exists():
                await anyio.sleep(0.05)
        assert (mp_dir / f"counter_{gone}.db").exists()
        after = await scrape(port, proc)
        assert total(after, "taskloom_tasks_succeeded_total") == 6
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
        assert not mp_dir.exists()   # the supervisor removed its directory
    finally:
        await purge(namespace)


async def _meet_stub(key: str) -> int:   # the producer's view of the task: name and signature
    raise AssertionError("runs in the worker processes only")


async def _add_stub(x: int, y: int) -> int:
    raise AssertionError("runs in the worker processes only")
