"""The scheduler loop with a clock the test moves: on-time ticks, the misfire
policies after a gap, and ``last_run`` surviving a restart of the scheduler
(the store outlives the scheduler object; on Redis, the process too)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from runtime.app import Runtime
from runtime.errors import ConfigError
from runtime.ops.scheduler import (
    MemoryScheduleStore,
    RedisScheduleStore,
    Scheduler,
    Schedules,
    ScheduleStore,
    every,
    run_scheduler,
    task_id_for,
)
from runtime.worker import Worker
from tests.conftest import REDIS_URL
from tests.scheduler.clock import FakeClock

T0 = datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC)  # a second after a tick of every(10)
#: Generous: a loaded 2-core machine may stall the loop for seconds.
WAIT_S = 30


def at_s(seconds: int) -> datetime:
    return datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


async def wait_until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT_S):
        while not check():
            await anyio.sleep(0.01)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[ScheduleStore]:
    if request.param == "memory":
        yield MemoryScheduleStore()
        return
    redis_store = RedisScheduleStore(REDIS_URL, namespace=namespace)
    async with redis_store:
        try:
            yield redis_store
        finally:
            await redis_store.purge()


class Harness:
    def __init__(self, store: ScheduleStore) -> None:
        self.rt = Runtime()
        self.store = store
        self.clock = FakeClock(T0)
        self.schedules = Schedules(self.rt, store, clock=self.clock)

        @self.rt.task(name="sched.job")
        async def job() -> str:
            return "ran"

        self.job = job

    async def ran(self, worker: Worker, seconds: list[int]) -> list[int]:
        """Which of the ticks at ``seconds`` have a result (after the worker is idle)."""
        await worker.idle()
        out = []
        for s in seconds:
            if await self.rt.results.get(task_id_for("s", at_s(s))) is not None:
                out.append(s)
        return out


async def start(tg: anyio.abc.TaskGroup, h: Harness) -> tuple[Scheduler, anyio.CancelScope]:
    scheduler = Scheduler(h.rt, h.store, clock=h.clock, lease_s=5, grace_s=2)
    scope = anyio.CancelScope()

    async def run(*, task_status: Any) -> None:
        with scope:
            await scheduler.run(task_status=task_status)

    await tg.start(run)
    return scheduler, scope


@pytest.mark.parametrize(("misfire", "max_catchup", "expected"), [
    ("skip", 100, [10]),
    ("run_once", 100, [10, 50]),
    ("run_all", 100, [10, 20, 30, 40, 50]),
    ("run_all", 2, [10, 40, 50]),
])
async def test_missed_ticks_follow_the_policy_after_a_restart(
        store: ScheduleStore, misfire: Any, max_catchup: int, expected: list[int]) -> None:
    h = Harness(store)
    async with h.rt, h.rt.worker() as worker, anyio.create_task_group() as tg:
        await h.schedules.add("s", h.job.s(), every(10), misfire=misfire, max_catchup=max_catchup)
        first, scope = await start(tg, h)
        await wait_until(lambda: first.sleeping_until == at_s(10))
        h.clock.set(at_s(10))  # on time
        await wait_until(lambda: first.sleeping_until == at_s(20))
        assert await h.ran(worker, [10]) == [10]
        scope.cancel()  # the scheduler stops; its lease is released

        h.clock.set(at_s(55))  # 20, 30, 40, 50 are missed
        second, scope = await start(tg, h)  # a new scheduler object: state from the store
        await wait_until(lambda: second.sleeping_until == at_s(60))
        assert await h.ran(worker, [0, 10, 20, 30, 40, 50]) == expected
        [info] = await h.schedules.list()
        assert info.last_run == at_s(55) if misfire != "skip" else info.last_run == at_s(10)
        assert info.next_run == at_s(60)
        assert info.last_outcome == "SUCCESS"

        h.clock.set(at_s(60))  # and on time again
        await wait_until(lambda: second.sleeping_until == at_s(70))
        assert await h.ran(worker, [60]) == [60]
        scope.cancel()


async def test_a_new_schedule_has_missed_nothing_before_it_was_created(store: ScheduleStore
                                                                       ) -> None:
    h = Harness(store)
    async with h.rt, h.rt.worker() as worker, anyio.create_task_group() as tg:
        h.clock.set(at_s(35))
        await h.schedules.add("s", h.job.s(), every(10), misfire="run_all")
        scheduler, scope = await start(tg, h)
        await wait_until(lambda: scheduler.sleeping_until == at_s(40))
        assert await h.ran(worker, [0, 10, 20, 30]) == []
        scope.cancel()


async def test_pause_resume_and_remove_are_seen_by_the_running_scheduler(store: ScheduleStore
                                                                         ) -> None:
    h = Harness(store)
    async with h.rt, h.rt.worker() as worker, anyio.create_task_group() as tg:
        scheduler, scope = await start(tg, h)
        await wait_until(lambda: scheduler.leading and scheduler.sleeping_until is None)
        await h.schedules.add("s", h.job.s(), every(10))
        await wait_until(lambda: scheduler.sleeping_until == at_s(10))
        await h.schedules.pause("s")
        await wait_until(lambda: "s" in scheduler.paused and scheduler.sleeping_until is None)
        h.clock.set(at_s(20))
        await anyio.sleep(0.1)
        assert await h.ran(worker, [10, 20]) == []
        assert (await h.schedules.list())[0].paused
        await h.schedules.resume("s")  # 20 is due now and on time
        await wait_until(lambda: scheduler.sleeping_until == at_s(30))
        assert await h.ran(worker, [10, 20]) == [20]
        assert await h.schedules.remove("s")
        assert not await h.schedules.remove("s")  # idempotent, says it did nothing
        await wait_until(lambda: "s" not in scheduler.view and scheduler.sleeping_until is None)
        scope.cancel()


async def test_code_declared_schedules_sync_on_start_and_keep_a_runtime_pause(
        store: ScheduleStore) -> None:
    h = Harness(store)
    h.schedules.declare("s", h.job.s(), every(10))
    async with h.rt, anyio.create_task_group() as tg:
        scheduler = Scheduler(h.rt, h.store, clock=h.clock, declared=h.schedules.declared.values())
        scope = anyio.CancelScope()

        async def run(*, task_status: Any) -> None:
            with scope:
                await scheduler.run(task_status=task_status)

        await tg.start(run)
        assert [i.name for i in await h.schedules.list()] == ["s"]
        await h.schedules.pause("s")
        scope.cancel()
        h.schedules.declare("s", h.job.s(), every(20))  # the code changed; the pause stays
        again = Scheduler(h.rt, h.store, clock=h.clock, declared=h.schedules.declared.values())
        async with h.store:
            await again._sync_declared()
        [info] = await h.schedules.list()
        assert info.paused and info.rule == "every 0:00:20" and info.source == "code"


async def test_a_memory_store_is_refused_for_a_multiprocess_scheduler() -> None:
    rt = Runtime()
    with pytest.raises(ConfigError, match="shared by its processes"):
        await run_scheduler(rt, multiprocess=True)


async def test_run_scheduler_embedded_on_memory_publishes_ticks() -> None:
    rt = Runtime()

    @rt.task(name="sched.job")
    async def job() -> str:
        return "ran"

    clock = FakeClock(T0)
    schedules = Schedules(rt, clock=clock)
    await schedules.add("s", job.s(), every(10))
    rt_schedules = schedules  # what rt.schedules will return once wired
    assert rt_schedules.store.shared is False
    async with rt, rt.worker() as worker, anyio.create_task_group() as tg:
        scheduler = Scheduler(rt, schedules.store, clock=clock)
        await tg.start(scheduler.run)
        await wait_until(lambda: scheduler.sleeping_until == at_s(10))
        clock.set(at_s(10))
        await wait_until(lambda: scheduler.sleeping_until == at_s(20))
        await worker.idle()
        assert await rt.handle(task_id_for("s", at_s(10))).result(timeout=WAIT_S) == "ran"
        tg.cancel_scope.cancel()
