"""``runtime.testing.running`` (the helper offered to users for their own tests) and
``Worker.kill()`` (stop now: running tasks are cancelled, their deliveries go back)."""

from __future__ import annotations

import anyio
import pytest

from brokers.base import QueueStats
from runtime import Runtime, State, TaskError
from runtime.testing import running
from tests.runtime.helpers import LIMIT, dead_letters, stats


async def test_running_gives_a_connected_runtime_and_a_worker_on_the_given_queues() -> None:
    rt = Runtime()

    @rt.task
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(queue="other")
    async def other() -> str:
        return "other"

    @rt.task(retries=0)
    async def broken() -> None:
        raise ValueError("broken on purpose")

    with anyio.fail_after(LIMIT):
        async with running(rt, queues=["default"], concurrency=2, shutdown_grace_s=1) as worker:
            assert (worker.queues, worker.concurrency) == (["default"], 2)
            handle = await rt.enqueue(add.s(1, 2))
            failing = await rt.enqueue(broken.s())
            waiting = await rt.enqueue(other.s())  # no worker of "other" runs here
            await worker.idle()
            assert await handle.result(timeout=1) == 3
            with pytest.raises(TaskError, match="broken on purpose"):
                await failing.result(timeout=1)
            # the real settlement path: the failed task is dead-lettered, not lost
            assert await dead_letters(rt) == [(failing.id, "failed")]
            assert await waiting.status() is State.PENDING
            assert await stats(rt, "other") == QueueStats(ready=1)


async def test_kill_cancels_running_tasks_and_their_deliveries_come_back(rt: Runtime) -> None:
    started = anyio.Event()
    runs: list[int] = []

    @rt.task
    async def long() -> str:
        runs.append(1)
        if len(runs) == 1:
            started.set()
            await anyio.sleep_forever()  # only the first delivery hangs
        return "done"

    with anyio.fail_after(LIMIT):
        async with rt:
            handle = await rt.enqueue(long.s())
            async with rt.worker(shutdown_grace_s=LIMIT * 10) as worker:
                await started.wait()
                worker.kill()  # not the grace period: the task is cancelled now
            assert await handle.status() is State.PENDING
            assert await stats(rt) == QueueStats(ready=1)
            async with rt.worker() as again:
                assert await handle.result(timeout=LIMIT) == "done"
                await again.idle()
    assert len(runs) == 2
