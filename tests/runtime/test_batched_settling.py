"""Plain successes stored in batches off the runners (runtime/settling.py) and
the Redis consumer's one-at-a-time wake-ups (brokers/redis/ready.py): late ack
still holds, every delivery is still handed out."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from brokers.redis.ready import ReadyQueue
from runtime import Runtime
from runtime.messages import Result, State
from runtime.results.memory import MemoryResultStore

from .helpers import LIMIT, stats

REDIS_URL = "redis://127.0.0.1:6379/0"


class GatedStore(MemoryResultStore):
    """A memory store whose batched writes wait until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.waiting = anyio.Event()

    async def put_many(self, results: Sequence[Result]) -> list[bool]:
        if any(r.state is State.SUCCESS for r in results):
            self.waiting.set()
            await self.gate.wait()
        return await super().put_many(results)


def make(backend: str, namespace: str, store: GatedStore) -> Runtime:
    if backend == "memory":
        return Runtime(results=store)
    import brokers

    return Runtime(broker=brokers.from_url(REDIS_URL, namespace=namespace), results=store)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_success_is_acked_only_after_its_result_is_stored(
        backend: str, namespace: str) -> None:
    store = GatedStore()
    rt = make(backend, namespace, store)

    @rt.task(name="noop")
    async def noop(i: int) -> int:
        return i

    with anyio.fail_after(LIMIT):
        async with rt:
            try:
                async with rt.worker(concurrency=4) as worker:
                    handles = await rt.enqueue_many([noop.s(i) for i in range(10)])
                    await store.waiting.wait()  # the body ran; its result write is held
                    held = await stats(rt)
                    stored = [await rt.results.get(h.id) for h in handles]
                    store.gate.set()
                    await worker.idle()
                    done = await stats(rt)
                    values = [await h.result() for h in handles]
            finally:
                if backend == "redis":
                    await rt.broker.purge_namespace()  # type: ignore[attr-defined]
    # while the write was held nothing was acked, nor stored as a success
    assert held.in_flight > 0 and held.in_flight + held.ready == 10
    assert not any(r is not None and r.state is State.SUCCESS for r in stored)
    assert done.in_flight == done.ready == 0
    assert values == list(range(10))
    assert worker.processed == 10


async def test_a_receiver_cancelled_while_waiting_is_not_woken_in_vain() -> None:
    freed: list[int] = []
    queue: ReadyQueue[int] = ReadyQueue(lambda: freed.append(1))
    got: list[int] = []

    async def take(scope_out: list[anyio.CancelScope]) -> None:
        with anyio.CancelScope() as scope:
            scope_out.append(scope)
            got.append(await queue.get())

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            first: list[anyio.CancelScope] = []
            second: list[anyio.CancelScope] = []
            tg.start_soon(take, first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(take, second)
            await anyio.wait_all_tasks_blocked()
            first[0].cancel()  # the first waiter leaves ...
            await anyio.wait_all_tasks_blocked()
            queue.append(7)
            queue.announce()  # ... so the one wake-up goes to the second
    assert got == [7]
    assert freed == [1]


async def test_every_delivery_is_handed_out_while_receivers_stay_busy() -> None:
    queue: ReadyQueue[int] = ReadyQueue(lambda: None)
    got: list[int] = []
    takers: set[int] = set()

    async def receiver(me: int) -> None:
        while True:
            try:
                item = await queue.get()
            except anyio.EndOfStream:
                return
            got.append(item)
            takers.add(me)
            await anyio.sleep(0)  # a task that suspends: another receiver takes the next

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as tg:
            for me in range(3):
                tg.start_soon(receiver, me)
            await anyio.wait_all_tasks_blocked()
            for i in range(9):  # one batch
                queue.append(i)
            queue.announce()
            await anyio.wait_all_tasks_blocked()
            queue.close()
    assert sorted(got) == list(range(9))
    assert takers == {0, 1, 2}  # a busy receiver's next delivery went to an idle one


class CountingStore(MemoryResultStore):
    """Counts the results stored through ``put_many`` (the settler's batches)."""

    def __init__(self) -> None:
        super().__init__()
        self.batched = 0

    async def put_many(self, results: Sequence[Result]) -> list[bool]:
        self.batched += sum(r.state is State.SUCCESS for r in results)
        return await super().put_many(results)


async def test_a_limited_task_elsewhere_in_the_app_keeps_the_batched_path() -> None:
    """An app with one rate-limited task installs the limits gate; its other,
    unlimited tasks still have their successes stored in batches (issue 16:
    waiting on a limit must not slow the rest of the worker)."""
    store = CountingStore()
    rt = Runtime(results=store)

    @rt.task(name="limited", rate_limit="1000/s")
    async def limited() -> None:
        return None

    @rt.task(name="plain")
    async def plain(i: int) -> int:
        return i

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=4):
            handles = await rt.enqueue_many([plain.s(i) for i in range(20)])
            assert [await h for h in handles] == list(range(20))
            await rt.run(limited.s())
    assert rt.gates, "the limits gate is installed"
    assert store.batched >= 20
