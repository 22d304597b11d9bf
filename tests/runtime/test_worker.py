"""The worker: concurrency, queues, idle, graceful drain and hand-back."""

from __future__ import annotations

import anyio
import pytest

from brokers.base import QueueStats
from runtime import ConfigError, Runtime, State, Worker, run
from tests.runtime.helpers import LIMIT, stats


async def test_concurrency_limit_is_respected(rt: Runtime) -> None:
    limit = 3
    current = peak = 0
    full = anyio.Event()

    @rt.task
    async def job(i: int) -> int:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        if current == limit:
            full.set()
        await full.wait()  # the first `limit` jobs are all running at once
        for _ in range(3):
            await anyio.lowlevel.checkpoint()  # give an over-eager worker a chance to start more
        current -= 1
        return i

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=limit) as worker:
            handles = await rt.enqueue_many(job.s(i) for i in range(20))
            await worker.idle()
            assert [await h.result(timeout=1) for h in handles] == list(range(20))
    assert peak == limit


async def test_thread_tasks_count_against_concurrency(rt: Runtime) -> None:
    import threading

    lock = threading.Lock()
    current = peak = 0

    @rt.task
    def job() -> None:
        nonlocal current, peak
        with lock:
            current += 1
            peak = max(peak, current)
        with lock:
            current -= 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=2) as worker:
            await rt.enqueue_many(job.s() for _ in range(30))
            await worker.idle()
    assert 1 <= peak <= 2


async def test_idle_returns_at_once_when_there_is_nothing_to_do(rt: Runtime) -> None:
    @rt.task
    async def noop() -> None:
        pass

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await worker.idle()
            assert worker.in_flight == 0


async def test_idle_waits_for_delayed_work(rt: Runtime) -> None:
    done: list[int] = []

    @rt.task
    async def later() -> None:
        done.append(1)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.enqueue(later.s(), countdown=0.05)
            await worker.idle()
            assert done == [1]


async def test_queues_default_to_every_registered_tasks_queue(rt: Runtime) -> None:
    @rt.task
    async def a() -> str:
        return "a"

    @rt.task(queue="io")
    def b() -> str:
        return "b"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert worker.queues == ["default", "io"]
            assert await run(a.s()) == "a"
            assert await run(b.s()) == "b"


async def test_queues_narrow_what_a_worker_takes(rt: Runtime) -> None:
    @rt.task
    async def a() -> str:
        return "a"

    @rt.task(queue="io")
    async def b() -> str:
        return "b"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(queues=["io"]) as worker:
            handle_a = await rt.enqueue(a.s())
            assert await run(b.s()) == "b"
            await worker.idle()
            assert await handle_a.status() is State.PENDING
            assert await stats(rt, "default") == QueueStats(ready=1)


def test_a_worker_without_tasks_consumes_the_default_queue() -> None:
    rt = Runtime()
    assert Worker(rt).queues == ["default"]


@pytest.mark.parametrize("kwargs", [dict(concurrency=0), dict(prefetch=0)])
def test_bad_worker_settings(rt: Runtime, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Worker(rt, **kwargs)


def test_bad_worker_settings_are_config_errors(rt: Runtime) -> None:
    with pytest.raises(ConfigError):
        Worker(rt, concurrency=0)


async def test_stop_drains_in_flight_and_hands_back_the_rest(rt: Runtime) -> None:
    started: list[int] = []
    two_started, release = anyio.Event(), anyio.Event()

    @rt.task
    async def job(i: int) -> int:
        started.append(i)
        if len(started) == 2:
            two_started.set()
        await release.wait()
        return i

    with anyio.fail_after(LIMIT):
        async with rt:
            handles = await rt.enqueue_many(job.s(i) for i in range(5))
            async with rt.worker(concurrency=2) as worker:
                await two_started.wait()
                worker.stop()  # stop taking work ...
                release.set()  # ... while the two in flight finish
            assert worker.in_flight == 0
            assert sorted(started) == [0, 1]
            for h in handles[:2]:
                assert await h.status() is State.SUCCESS
            # nothing lost: the rest is ready again, nothing left leased
            assert await stats(rt) == QueueStats(ready=3)
            async with rt.worker() as second:
                await second.idle()
            assert [await h.result(timeout=1) for h in handles] == [0, 1, 2, 3, 4]


async def test_a_task_past_the_grace_period_is_cancelled_and_redelivered(rt: Runtime) -> None:
    runs: list[int] = []
    started = anyio.Event()

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
            async with rt.worker(shutdown_grace_s=0.05):
                await started.wait()
            assert await handle.status() is State.PENDING
            assert await stats(rt) == QueueStats(ready=1)
            async with rt.worker() as worker:
                assert await handle.result(timeout=LIMIT) == "done"
                await worker.idle()
            info = await handle.info()
    assert info is not None
    assert info.delivery_count == 2
    assert info.attempt == 1
    assert len(runs) == 2


async def test_leaving_the_runtime_with_a_worker_running_drains_it(rt: Runtime) -> None:
    started = anyio.Event()
    finished: list[int] = []

    @rt.task
    async def quick() -> None:
        started.set()
        for _ in range(20):  # still running when the block is left; a cancel would land here
            await anyio.lowlevel.checkpoint()
        finished.append(1)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            await rt.enqueue(quick.s())
            await started.wait()
            assert finished == []  # leave while the task runs
    assert finished == [1]  # drained: run to its end, not cancelled
    assert await stats(rt) == QueueStats()
