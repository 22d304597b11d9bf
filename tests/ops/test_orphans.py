"""Worker inspection when a worker dies (issue 14, done when): a CLI worker
killed with SIGKILL disappears from ``Operations(rt).workers()`` once its
heartbeat expires, the tasks it was running show as orphaned, and then the
broker redelivers them to another worker and they complete.

The broker's lease (``lease_s`` in the URL) is longer than the heartbeat TTL
(3 beats of ``--heartbeat``) so that the orphans are visible before the
redelivery; the ledger written by the task bodies says what ran where."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from runtime import Runtime
from runtime.ops.api import Operations
from runtime.ops.workers import WorkerInfo
from tests.conftest import REDIS_URL, server_missing
from tests.supervisor.conftest import APP, Env, WorkerCommand, wait_until
from tests.supervisor.test_redis_workers import ended

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.fault]

#: the broker hands a dead consumer's deliveries to another after this many seconds
LEASE_S = 8
#: seconds between heartbeats: a heartbeat lives 3 of them (1.5 s), well under LEASE_S
BEAT = "0.5"
#: long enough for the kill to land mid-task, short enough for the second run
TASK_S = 3.0


@pytest.fixture
async def env(tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
              ) -> AsyncIterator[Env]:
    import brokers

    url = f"{REDIS_URL}?lease_s={LEASE_S}&max_deliveries=5"
    broker: Any = brokers.from_url(url, namespace=namespace)
    try:
        await broker.__aenter__()
    except Exception as e:
        server_missing("Redis", e)
    monkeypatch.setenv("TASKLOOM_TEST_RESULTS", REDIS_URL)  # the task index on Redis
    env = Env(tmp_path, broker=url, namespace=namespace)
    try:
        yield env
    finally:
        env.close()
        await broker.purge_namespace()
        await broker.__aexit__(None, None, None)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


def start_worker(env: Env) -> WorkerCommand:
    return env.start("worker", APP, "--pool-size", "0", "--heartbeat", BEAT,
                     "--concurrency", "4", "--shutdown-grace", "5")


@asynccontextmanager
async def producer(env: Env) -> AsyncIterator[Runtime]:
    """The test's runtime on the workers' broker and result store (sv.work by name)."""
    rt = Runtime(broker=env.broker, results=REDIS_URL, namespace=env.namespace)

    @rt.task(name="sv.work")
    async def work(key: str, sleep_s: float = 0.0) -> str:
        raise AssertionError("the producer never runs tasks")

    async with rt:
        yield rt


async def live(ops: Operations, pid: int) -> WorkerInfo | None:
    return next((w for w in await ops.workers() if w.pid == pid), None)


async def poll(check: Any, what: str) -> Any:
    """The first truthy result of ``await check()``, bounded (never a timing assertion)."""
    try:
        with anyio.fail_after(60):
            while not (value := await check()):
                await anyio.sleep(0.1)
            return value
    except TimeoutError:
        pytest.fail(f"timed out after 60s waiting for {what}")


async def test_a_killed_worker_disappears_and_its_tasks_are_orphaned_then_redelivered(
        env: Env) -> None:
    first = start_worker(env)
    await wait_until(lambda: first.logs("worker started"), what="the first worker")
    keys = [f"o{i}" for i in range(3)]
    async with producer(env) as rt, Operations(rt) as ops:
        handles = [await rt.enqueue(rt.signature("sv.work", key, TASK_S)) for key in keys]
        ids = {h.id for h in handles}
        await wait_until(lambda: len(env.ledger.records("START")) == len(keys),
                         what="the three tasks to start")

        async def running_all() -> WorkerInfo | None:
            info = await live(ops, first.pid)
            return info if info is not None and {t.id for t in info.tasks} == ids else None

        info = await poll(running_all, "the heartbeat to list the running tasks")
        assert info.state == "running" and info.in_flight == len(keys)
        assert all(t.name == "sv.work" and t.started_ms > 0 for t in info.tasks)
        os.kill(first.pid, signal.SIGKILL)  # only the pid this test started

        async def gone() -> bool:
            return await live(ops, first.pid) is None

        await poll(gone, "the killed worker to leave the live workers")

        async def orphaned() -> set[str]:
            return {s.id for s in await ops.orphans()}

        assert await poll(orphaned, "orphaned tasks") == ids
        assert {s.worker for s in await ops.orphans()} == {info.id}
        assert not ended(env)  # not redelivered yet: the lease outlives the heartbeat

        second = start_worker(env)
        await wait_until(lambda: ended(env) == set(keys), what="the redelivered tasks to end")
        assert {r["pid"] for r in env.ledger.records("END")} == {second.pid}

        async def none_orphaned() -> bool:
            return not await orphaned()

        await poll(none_orphaned, "no orphans once the tasks ended")
        assert [await h.result() for h in handles] == keys
