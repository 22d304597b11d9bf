"""handle.cancel() on a running plain async task (one run without a cancel
scope of its own: runtime.execution.Revocable) stops its body at the await it
is suspended in, and again at each later await if the body swallows it."""

from __future__ import annotations

import anyio
import pytest

from runtime import Runtime, State, TaskCancelled
from tests.runtime.helpers import LIMIT


async def test_cancel_stops_a_running_body_at_its_await(rt: Runtime) -> None:
    started, never = anyio.Event(), anyio.Event()
    seen: list[str] = []

    @rt.task
    async def long() -> int:
        started.set()
        try:
            await never.wait()
            seen.append("went on")
        except BaseException as e:
            seen.append(type(e).__name__)
            raise
        return 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(long.s())
            await started.wait()
            assert await handle.cancel() is True
            await worker.idle()  # returns only once the body is done: never was not set
            assert await handle.status() is State.REVOKED
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=1)
    assert seen == ["CancelledError"]


async def test_a_body_that_swallows_the_cancel_is_cancelled_at_its_next_await(
        rt: Runtime) -> None:
    started, never = anyio.Event(), anyio.Event()
    seen: list[str] = []

    @rt.task
    async def stubborn() -> int:
        started.set()
        for _ in range(2):
            try:
                await never.wait()
            except BaseException as e:  # swallowed, against all advice
                seen.append(type(e).__name__)
        return 1

    @rt.task
    async def after() -> int:
        return 2

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1) as worker:
            handle = await rt.enqueue(stubborn.s())
            await started.wait()
            assert await handle.cancel() is True
            # the same runner takes the next task: no cancellation is left behind
            assert await (await rt.enqueue(after.s())).result(timeout=LIMIT) == 2
            await worker.idle()
            assert await handle.status() is State.REVOKED
    assert seen == ["CancelledError", "CancelledError"]
