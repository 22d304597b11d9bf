"""Caller-chosen task ids: validated before anything is sent, and an id the
result store already has (finished within the result TTL, cancelled, retrying)
is not sent again (``handle.duplicate``). An id still pending or running is
caught by the reservation made before publishing (``tests/runtime/test_front_door_ids.py``)."""

from __future__ import annotations

import anyio
import pytest

from brokers.base import QueueStats
from runtime import EnqueueError, Runtime, State
from tests.conftest import REDIS_URL
from tests.runtime.helpers import LIMIT, Counter, stats


@pytest.mark.parametrize(
    "bad",
    ["", " ", "a b", "tab\there", "line\nbreak", "nul\x00", "x" * 201, "é" * 101, 42, None],
    ids=["empty", "space", "inner-space", "tab", "newline", "nul", "201-bytes",
         "202-utf8-bytes", "int", "explicit-none-is-ok-but-not-here"],
)
async def test_a_bad_task_id_is_refused_before_anything_is_sent(rt: Runtime, bad: object) -> None:
    @rt.task
    async def noop() -> None: ...

    if bad is None:  # None means "generate one": accepted
        async with rt:
            handle = await rt.enqueue(noop.s(), task_id=None)
            assert handle.id and not handle.duplicate
        return
    with anyio.fail_after(LIMIT):
        try:
            async with rt:
                await rt.enqueue(noop.s(), task_id=bad)  # type: ignore[arg-type]
        except EnqueueError as e:  # the user's own except, outside the runtime block
            message = str(e)
        else:
            raise AssertionError(f"task_id {bad!r} was accepted")
        assert "task_id" in message
        async with rt:
            assert await stats(rt) == QueueStats()  # nothing sent


async def test_good_task_ids_are_accepted(rt: Runtime) -> None:
    @rt.task
    async def noop() -> None: ...

    async with rt:
        for good in ("sched:report:1700000000000", "a" * 200, "order-42_v1.x", "ü" * 100):
            handle = await rt.enqueue(noop.s(), task_id=good)
            assert (handle.id, handle.duplicate) == (good, False)


async def test_an_id_that_finished_is_not_run_again(rt: Runtime) -> None:
    counter = Counter()

    @rt.task
    async def count() -> int:
        return counter()

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            first = await rt.enqueue(count.s(), task_id="job-1")
            assert not first.duplicate
            assert await first.result() == 1
            again = await rt.enqueue(count.s(), task_id="job-1")
            assert again.duplicate and again.id == "job-1"
            assert await again.result() == 1  # the existing outcome
            await worker.idle()
    assert counter.n == 1


async def test_an_id_that_was_cancelled_is_not_sent_again(rt: Runtime) -> None:
    counter = Counter()

    @rt.task
    async def count() -> int:
        return counter()

    with anyio.fail_after(LIMIT):
        async with rt:
            first = await rt.enqueue(count.s(), task_id="job-2")
            assert await first.cancel()
            again = await rt.enqueue(count.s(), task_id="job-2")
            assert again.duplicate
            assert await stats(rt) == QueueStats(ready=1)  # only the first, never run
            async with rt.worker() as worker:
                await worker.idle()
            assert await again.status() is State.REVOKED
    assert counter.n == 0


@pytest.mark.redis
async def test_an_id_that_finished_is_not_run_again_on_redis(namespace: str) -> None:
    rt = Runtime(broker=REDIS_URL, namespace=namespace)
    counter = Counter()

    @rt.task
    async def count() -> int:
        return counter()

    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                assert await (await rt.enqueue(count.s(), task_id="job-3")).result() == 1
            # another producer, same store: the id is taken
            producer = Runtime(broker=REDIS_URL, namespace=namespace)
            producer.registry.add(count)
            async with producer:
                again = await producer.enqueue(count.s(), task_id="job-3")
                assert again.duplicate
                assert await again.result(timeout=LIMIT) == 1
                assert await stats(producer) == QueueStats()  # nothing sent
    finally:
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]
    assert counter.n == 1
