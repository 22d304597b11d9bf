"""handle.cancel() stops a running task (issue 13 item 7), memory and Redis."""

from __future__ import annotations

import anyio
import pytest

from runtime import Runtime, State, TaskCancelled, current_task, group
from tests.conftest import REDIS_URL

LIMIT = 20.0  # bound on every wait; the work here takes milliseconds


def other_runtime(rt: Runtime) -> Runtime:
    """Another client of the same stores (on Redis: its own connections, as a
    caller in another process would have); on memory the same runtime."""
    if rt.namespace == "":
        return rt
    return Runtime(broker=REDIS_URL, namespace=rt.namespace)


async def test_cancel_stops_a_running_async_task(rt: Runtime) -> None:
    inside = anyio.Event()
    after: list[str] = []
    hooks: list[str] = []

    @rt.task(on_failure=lambda ctx, e: hooks.append("failure"),
             on_cancel=lambda ctx: hooks.append(f"cancel:{ctx.id}"))
    async def long() -> str:
        inside.set()
        await anyio.sleep(60)
        after.append("ran past the cancel")
        return "late"

    @rt.task
    async def follow(x: str) -> None:
        after.append("follow-up ran")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(long.s() | follow.s())
            await inside.wait()
            first_id = next(iter(worker.running))
            caller = other_runtime(rt)
            async with caller:
                assert await caller.handle(first_id).cancel()
            with pytest.raises(TaskCancelled):
                await rt.handle(first_id).result(timeout=LIMIT)
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=LIMIT)  # the chain's rest is cancelled with it
            await worker.idle()
            stats = await rt.broker.stats("default")
            status = await rt.handle(first_id).status()
    assert after == []
    assert status is State.REVOKED
    assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (0, 0, 0, 0)
    assert hooks == [f"cancel:{first_id}"]


async def test_cancel_tells_a_thread_task(rt: Runtime) -> None:
    inside = anyio.Event()
    steps: list[int] = []

    @rt.task
    def loops() -> int:
        ctx = current_task()
        anyio.from_thread.run_sync(inside.set)
        for i in range(6000):  # ~60 s unless cancelled
            ctx.raise_if_cancelled()
            steps.append(i)
            anyio.from_thread.run(anyio.sleep, 0.01)
        return len(steps)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(loops.s())
            await inside.wait()
            assert await handle.cancel()
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=LIMIT)
            await worker.idle()
            assert await handle.status() is State.REVOKED
    assert len(steps) < 6000


async def test_cancelling_a_group_stops_its_running_members(rt: Runtime) -> None:
    started: list[str] = []
    after: list[str] = []
    both = anyio.Event()

    @rt.task
    async def member(i: int) -> int:
        started.append(current_task().id)
        if len(started) == 2:
            both.set()
        await anyio.sleep(60)
        after.append(f"member {i} ran on")
        return i

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(group(member.s(1), member.s(2)))
            await both.wait()
            assert await handle.cancel()
            for member_id in started:
                with pytest.raises(TaskCancelled):
                    await rt.handle(member_id).result(timeout=LIMIT)
            await worker.idle()
    assert after == []
