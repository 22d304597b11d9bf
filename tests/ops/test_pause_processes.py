"""Pause and resume a queue (issue 14, item 4): workers stop taking from a paused
queue and take again once it is resumed; enqueue still works meanwhile.

Two real ``taskloom worker`` processes on the shared Redis (a unique namespace),
the queue paused through ``Operations(rt)``; the ledger the task bodies write
(outside the system under test) says what ran. And the same on the memory
runtime with an embedded worker given ``pauses_for(rt)``."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from runtime import Runtime
from runtime.ops.api import Operations, pauses_for
from runtime.worker import Worker
from tests.conftest import REDIS_URL
from tests.supervisor import conftest as supervised
from tests.supervisor.conftest import APP, Env, WorkerCommand, wait_until
from tests.supervisor.test_redis_workers import ended, enqueue_work, producer

PAUSED_LOG = "every queue of this worker is paused; taking nothing until one is resumed"
#: how long a paused queue is watched for a task that should not start; waiting for
#: nothing to happen has to be a bounded observation (no event marks "never")
QUIET_S = 3.0


#: the supervisor tests' fixture: Redis broker with short leases, a unique namespace
_redis_env = supervised.redis_env


@pytest.fixture
def env(_redis_env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Worker processes whose results (hence task index and pauses) are on Redis."""
    monkeypatch.setenv("TASKLOOM_TEST_RESULTS", REDIS_URL)
    return _redis_env


def start_worker(env: Env) -> WorkerCommand:
    return env.start("worker", APP, "--pool-size", "0", "--heartbeat", "0.5",
                     "--concurrency", "4", "--shutdown-grace", "5")


@pytest.mark.redis
@pytest.mark.slow
async def test_two_worker_processes_hold_a_paused_queue_until_it_is_resumed(env: Env) -> None:
    workers = [start_worker(env), start_worker(env)]
    await wait_until(lambda: all(w.logs("worker started") for w in workers),
                     what="both workers consuming")
    keys = [f"p{i}" for i in range(50)]
    async with producer(env) as rt, Operations(rt) as ops:
        assert await ops.pause("default") is True
        assert await ops.pause("default") is False  # idempotent: says nothing changed
        await wait_until(lambda: all(w.logs(PAUSED_LOG) for w in workers),
                         what="both workers to stop consuming the paused queue")
        await enqueue_work(rt, keys, 0.0)  # enqueue still works while paused
        await anyio.sleep(QUIET_S)
        assert env.ledger.records("START") == []
        assert (await rt.broker.stats("default")).ready == len(keys)
        assert await ops.resume("default") is True
        await wait_until(lambda: ended(env) == set(keys), what="every task to end")
    assert max(Counter(env.ledger.keys("START")).values()) == 1
    assert all(w.proc.poll() is None for w in workers)


async def test_an_embedded_worker_takes_only_from_queues_not_paused() -> None:
    rt = Runtime("memory://")
    ran: list[str] = []

    @rt.task(name="p.a", queue="a")
    async def on_a(key: str) -> None:
        ran.append(key)

    @rt.task(name="p.b", queue="b")
    async def on_b(key: str) -> None:
        ran.append(key)

    async with rt, Operations(rt) as ops:
        await ops.pause("a")
        worker = Worker(rt, queues=["a", "b"], concurrency=4, pauses=pauses_for(rt))
        with anyio.fail_after(30):  # a bound, not a timing: the run takes milliseconds
            async with anyio.create_task_group() as tg:
                await tg.start(worker.serve)
                handles = [await rt.enqueue(on_a.s(f"a{i}")) for i in range(20)]
                b = [await rt.enqueue(on_b.s(f"b{i}")) for i in range(20)]
                for handle in b:
                    await handle.result()
                assert sorted(ran) == sorted(f"b{i}" for i in range(20))
                assert (await rt.broker.stats("a")).ready == 20
                await ops.pause("b")
                await ops.resume("a")
                for handle in handles:
                    await handle.result()
                assert len(ran) == 40
                await ops.pause("a")  # every queue paused: the worker waits, stop() ends it
                worker.stop()
    assert worker.state == "stopped"
