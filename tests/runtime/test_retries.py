"""Retries, Retry/Reject, retry_on, time limits."""

from __future__ import annotations

import threading
import time

import anyio
import anyio.to_thread
import pytest

from runtime import (
    Reject,
    Retry,
    Runtime,
    State,
    TaskDeadLettered,
    TaskError,
    TaskTimeLimitExceeded,
    run,
)
from tests.runtime.helpers import LIMIT, dead_letters


async def test_retries_back_off_then_succeed(rt: Runtime) -> None:
    tries: list[float] = []

    @rt.task(retries=3, backoff=0.02, backoff_factor=2, jitter=0)
    async def flaky() -> str:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ConnectionError("not yet")
        return "ok"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(flaky.s())
            assert await handle.result(timeout=LIMIT) == "ok"
            await worker.idle()
            info = await handle.info()
    assert len(tries) == 3
    assert tries[1] - tries[0] >= 0.02
    assert tries[2] - tries[1] >= 0.04
    assert info is not None
    assert (info.state, info.attempt) == (State.SUCCESS, 3)
    assert await dead_letters(rt) == []


async def test_out_of_retries_fails_and_dead_letters(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(retries=2, backoff=0.001, jitter=0)
    async def broken() -> None:
        calls.append(1)
        raise ValueError(f"broken #{len(calls)}")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(broken.s())
            with pytest.raises(TaskError, match="broken #3") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
            assert await handle.status() is State.FAILURE
    err = info.value
    assert type(err) is TaskError
    assert err.info.type == "ValueError"
    assert err.is_(ValueError)
    assert not err.is_(KeyError)
    assert err.info.reason == "failed"
    assert "ValueError: broken #3" in err.info.traceback
    assert err.task_id == handle.id
    assert len(calls) == 3
    assert await dead_letters(rt) == [(handle.id, "failed")]
    assert worker.failed == 1


async def test_retry_delay_is_honoured(rt: Runtime) -> None:
    tries: list[float] = []

    @rt.task(retries=1, backoff=0.0)
    async def later() -> int:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise Retry(0.1, reason="come back later")
        return len(tries)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(later.s()) == 2
    assert tries[1] - tries[0] >= 0.1


async def test_retry_counts_against_the_retries(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(retries=1, backoff=0.0)
    async def forever() -> None:
        calls.append(1)
        raise Retry(reason="again")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            with pytest.raises(TaskError, match="again"):
                await run(forever.s())
            await worker.idle()
    assert len(calls) == 2


async def test_reject_dead_letters_at_once_without_retries(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(retries=5, backoff=0.0)
    async def poison() -> None:
        calls.append(1)
        raise Reject("this input can never work")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(poison.s())
            with pytest.raises(TaskDeadLettered, match="can never work") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert info.value.info.reason == "rejected"
    assert len(calls) == 1
    assert await dead_letters(rt) == [(handle.id, "rejected")]


async def test_retry_on_restricts_what_is_retried(rt: Runtime) -> None:
    calls: dict[str, int] = {"value": 0, "key": 0}

    @rt.task(retries=3, backoff=0.0, retry_on=(ValueError,))
    async def picky(kind: str) -> None:
        calls[kind] += 1
        raise ValueError("retried") if kind == "value" else KeyError("not retried")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            with pytest.raises(TaskError, match="not retried") as key_error:
                await run(picky.s("key"))
            with pytest.raises(TaskError, match="retried"):
                await run(picky.s("value"))
            await worker.idle()
    assert calls == {"value": 4, "key": 1}
    assert key_error.value.info.type == "KeyError"
    assert not isinstance(key_error.value, TaskDeadLettered)


async def test_per_call_retries_override(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(retries=5, backoff=0.0)
    async def broken() -> None:
        calls.append(1)
        raise ValueError("no")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            with pytest.raises(TaskError):
                await run(broken.s().set(retries=0))
            await worker.idle()
    assert len(calls) == 1


async def test_an_async_task_past_its_time_limit(rt: Runtime) -> None:
    calls: list[int] = []

    @rt.task(timeout=0.05, retries=1, backoff=0.0)
    async def slow() -> None:
        calls.append(1)
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(slow.s())
            with pytest.raises(TaskTimeLimitExceeded, match="time limit") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert len(calls) == 2  # retried once
    assert info.value.info.type == "TaskTimeLimitExceeded"
    assert [reason for _, reason in await dead_letters(rt)] == ["time_limit"]


async def test_a_per_call_time_limit(rt: Runtime) -> None:
    @rt.task
    async def slow() -> None:
        await anyio.sleep_forever()

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            with pytest.raises(TaskTimeLimitExceeded):
                await run(slow.s().set(timeout=0.05))


async def test_a_thread_task_past_its_time_limit_is_given_up_on(rt: Runtime) -> None:
    """Documented: Python cannot interrupt a thread; the worker stops waiting,
    fails the task and frees its slot while the thread runs to its end."""
    release = threading.Event()
    finished = threading.Event()

    @rt.task(timeout=0.05)
    def stuck() -> str:
        release.wait(LIMIT)
        finished.set()
        return "too late"

    @rt.task
    async def other() -> int:
        return 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1) as worker:
            handle = await rt.enqueue(stuck.s())
            with pytest.raises(TaskTimeLimitExceeded):
                await handle.result(timeout=LIMIT)
            assert not finished.is_set()
            assert await run(other.s()) == 1  # the only slot is free again
            release.set()
            await anyio.to_thread.run_sync(finished.wait, LIMIT)
            await worker.idle()
            assert await handle.status() is State.FAILURE  # the late outcome is discarded


async def test_a_failing_thread_task(rt: Runtime) -> None:
    @rt.task
    def broken(x: int) -> int:
        raise ZeroDivisionError(f"{x} / 0")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            with pytest.raises(TaskError, match="1 / 0") as info:
                await run(broken.s(1))
    assert info.value.info.type == "ZeroDivisionError"


async def test_a_process_task_without_a_pool_fails_clearly(rt: Runtime) -> None:
    @rt.task(kind="process")
    def cpu(x: int) -> int:
        return x * x

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            with pytest.raises(TaskError, match="process") as info:
                await run(cpu.s(3))
            await worker.idle()
    assert info.value.info.type == "RuntimeError"
    assert "no process pool" in info.value.info.message
