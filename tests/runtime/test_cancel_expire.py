"""cancel() and expires: the task never runs, its status is REVOKED."""

from __future__ import annotations

import anyio
import pytest

from brokers.base import QueueStats
from runtime import Runtime, State, TaskCancelled, TaskError, chain
from tests.runtime.helpers import LIMIT, stats


async def test_an_expired_task_is_never_executed(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task
    async def work() -> None:
        calls.append(1)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            # delivered no earlier than 50 ms from now, expired 10 ms from now
            by_option = await rt.enqueue(work.s().set(countdown=0.05, expires=0.01))
            by_call = await rt.enqueue(work.s(), countdown=0.05, expires=0.01)
            await worker.idle()
            for handle in (by_option, by_call):
                assert await handle.status() is State.REVOKED
                info = await handle.info()
                assert info is not None and info.error is not None
                assert info.error.reason == "expired"
                with pytest.raises(TaskCancelled):
                    await handle.result(timeout=1)
    assert calls == []
    assert await stats(rt) == QueueStats()


async def test_task_level_expires(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(expires=0.01)
    async def work() -> None:
        calls.append(1)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(work.s(), countdown=0.05)
            await worker.idle()
            assert await handle.status() is State.REVOKED
    assert calls == []


async def test_cancel_a_pending_task(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task
    async def work() -> None:
        calls.append(1)

    with anyio.fail_after(LIMIT):
        async with rt:
            # No worker runs until the cancel is done: the order (cancel, then delivery)
            # is what is tested, with no wall-clock window a stall could close.
            handle = await rt.enqueue(work.s())
            assert await handle.cancel() is True
            assert await handle.status() is State.REVOKED
            with pytest.raises(TaskCancelled) as info:
                await handle.result(timeout=1)
            async with rt.worker() as worker:
                await worker.idle()  # the message is delivered and skipped
            assert await handle.cancel() is False  # already final
    assert calls == []
    assert info.value.task_id == handle.id
    assert isinstance(info.value, TaskError)
    assert await stats(rt) == QueueStats()


async def test_a_cancelled_task_says_it_was_cancelled(rt: Runtime) -> None:
    @rt.task
    async def work() -> None:
        pass

    with anyio.fail_after(LIMIT):
        async with rt:
            handle = await rt.enqueue(work.s())
            await handle.cancel()
            with pytest.raises(TaskCancelled, match="cancel"):
                await handle.result(timeout=1)


async def test_cancel_a_finished_task_changes_nothing(rt: Runtime) -> None:
    @rt.task
    async def one() -> int:
        return 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            handle = await rt.enqueue(one.s())
            assert await handle.result(timeout=LIMIT) == 1
            assert await handle.cancel() is False
            assert await handle.result(timeout=1) == 1


async def test_cancel_while_running_discards_the_outcome(rt: Runtime) -> None:
    started, release = anyio.Event(), anyio.Event()

    @rt.task
    async def long() -> int:
        started.set()
        await release.wait()
        return 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(long.s())
            await started.wait()
            assert await handle.cancel() is True
            release.set()
            await worker.idle()
            assert await handle.status() is State.REVOKED
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=1)


async def test_an_expired_chain_step_ends_the_chain(rt: Runtime) -> None:
    @rt.task
    async def first() -> int:
        return 1

    @rt.task
    async def second(x: int) -> int:
        return x + 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(chain(first.s().set(countdown=0.05, expires=0.01), second.s()))
            await worker.idle()
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=0.5)


async def test_cancelling_a_pending_chain_runs_none_of_it(rt: Runtime) -> None:
    calls: list[str] = []

    @rt.task
    async def first() -> int:
        calls.append("first")
        return 1

    @rt.task
    async def second(x: int) -> int:
        calls.append("second")
        return x + 1

    with anyio.fail_after(LIMIT):
        async with rt:
            # cancel before any worker runs: order, not a 50 ms window
            handle = await rt.enqueue(chain(first.s(), second.s()))
            assert await handle.cancel() is True
            async with rt.worker() as worker:
                await worker.idle()
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=1)
    assert calls == []
