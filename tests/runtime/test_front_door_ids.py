"""Idempotent task ids, atomically (issue 12, item 5): an explicit ``task_id`` is
reserved in the result store (put-if-absent) before anything is published, so an
id still PENDING (enqueued, not started) is not sent again; on every broker with
a shared result store (memory; Redis; RabbitMQ with Redis results).

Errors are caught the way a user does: outside every context manager the library
provides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from brokers.base import Envelope, PublishError
from brokers.memory import MemoryBroker
from runtime import Runtime, State
from runtime.errors import ResultStoreUnavailable
from runtime.results import MemoryResultStore
from tests.canvas.conftest import BROKERS, make_runtime, purge
from tests.runtime.helpers import LIMIT, Counter


@pytest.mark.parametrize("kind", BROKERS)
async def test_an_id_enqueued_twice_while_still_pending_runs_once(
        kind: str, namespace: str) -> None:
    rt = make_runtime(kind, namespace)
    counter = Counter()

    @rt.task(name="front_door.count")
    async def count() -> int:
        return counter()

    try:
        with anyio.fail_after(LIMIT):
            async with rt:
                first = await rt.enqueue(count.s(), task_id="order-1")
                second = await rt.enqueue(count.s(), task_id="order-1")  # no worker yet
                assert (first.duplicate, second.duplicate) == (False, True)
                assert second.id == "order-1"
                assert await first.status() is State.PENDING
                async with rt.worker() as worker:
                    assert await second.result() == 1
                    await worker.idle()
    finally:
        await purge(rt)
    assert counter.n == 1


@pytest.mark.parametrize("kind", BROKERS)
async def test_enqueue_many_with_explicit_ids_sends_each_id_once(
        kind: str, namespace: str) -> None:
    rt = make_runtime(kind, namespace)
    counter = Counter()

    @rt.task(name="front_door.record")
    async def record(i: int) -> int:
        counter(i)
        return i

    try:
        with anyio.fail_after(LIMIT):
            async with rt:
                pending = await rt.enqueue(record.s(0), task_id="b-0")
                handles = await rt.enqueue_many(
                    [record.s(10), record.s(1), record.s(11), record.s(2)],
                    task_ids=["b-0", "b-1", "b-1", None])
                assert not pending.duplicate
                assert [h.duplicate for h in handles] == [True, False, True, False]
                assert [h.id for h in handles[:3]] == ["b-0", "b-1", "b-1"]
                async with rt.worker() as worker:
                    assert [await h.result() for h in handles] == [0, 1, 1, 2]
                    await worker.idle()
    finally:
        await purge(rt)
    assert sorted(counter.calls) == [(0,), (1,), (2,)]


class FlakyBroker(MemoryBroker):
    """The memory broker, whose next ``fail`` publishes raise PublishError."""

    fail = 0

    async def publish(self, envelope: Envelope) -> None:
        if self.fail:
            self.fail -= 1
            raise PublishError(f"test: publish of {envelope.id} refused")
        await super().publish(envelope)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        if self.fail:
            self.fail -= 1
            raise PublishError("test: publish_many refused")
        await super().publish_many(envelopes)


class RolledBackRelease(MemoryResultStore):
    """A memory store whose release succeeds and is then undone, as a Redis killed
    before its AOF write rolls back an acknowledged DEL (the 30-minute chaos soak)."""

    async def release(self, task_ids: Sequence[str]) -> None:
        await super().release(task_ids)
        await self.reserve(list(task_ids))


class NoRelease(MemoryResultStore):
    """A memory store that cannot be reached to release reservations."""

    async def release(self, task_ids: Sequence[str]) -> None:
        raise ResultStoreUnavailable("test: the result store is unreachable")


@pytest.mark.parametrize("store", [MemoryResultStore, NoRelease, RolledBackRelease])
async def test_an_id_whose_publish_failed_can_be_enqueued_again(store: Any) -> None:
    broker, results = FlakyBroker(), store()
    rt = Runtime(broker=broker, results=results)
    counter = Counter()

    @rt.task(name="front_door.once")
    async def once() -> int:
        return counter()

    broker.fail = 1
    with anyio.fail_after(LIMIT):
        try:
            async with rt:
                await rt.enqueue(once.s(), task_id="retry-me")
        except PublishError:
            pass
        else:
            raise AssertionError("the refused publish did not raise")
        async with rt:
            again = await rt.enqueue(once.s(), task_id="retry-me")
            assert not again.duplicate  # this runtime's own failed try is not a duplicate
            if store is NoRelease:  # another process still sees the stale reservation
                other = Runtime(broker=broker, results=results)
                other.registry.add(once)
                async with other:
                    assert (await other.enqueue(once.s(), task_id="retry-me")).duplicate
            async with rt.worker() as worker:
                assert await again.result() == 1
                await worker.idle()
    assert counter.n == 1


class CountingStore(MemoryResultStore):
    reserved = 0

    async def reserve(self, task_ids: Sequence[str]) -> list[bool]:
        self.reserved += 1
        return await super().reserve(task_ids)


async def test_generated_ids_are_never_reserved_and_a_batch_reserves_once() -> None:
    results = CountingStore()
    rt = Runtime(results=results)

    @rt.task(name="front_door.noop")
    async def noop() -> None:
        return None

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            await rt.enqueue(noop.s())
            await rt.enqueue_many([noop.s(), noop.s()])
            await rt.run(noop.s())
            assert results.reserved == 0
            await rt.enqueue_many([noop.s()] * 3, task_ids=["x-1", "x-2", "x-3"])
            assert results.reserved == 1


async def test_enqueue_many_refuses_task_ids_that_do_not_fit(rt: Runtime) -> None:
    @rt.task(name="front_door.noop2")
    async def noop() -> None:
        return None

    from runtime import EnqueueError

    for bad, match in (({"task_ids": ["a"]}, "1 task_ids for 2"),
                       ({"task_ids": ["a", "b c"]}, "task_id"),
                       ({"task_ids": ["a", "b"], "rate": "10/s"}, "not both")):
        try:
            async with rt:
                await rt.enqueue_many([noop.s(), noop.s()], **bad)
        except EnqueueError as e:
            assert match in str(e)
        else:
            raise AssertionError(f"enqueue_many accepted {bad}")
