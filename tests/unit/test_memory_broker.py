"""The memory broker on its own: leases, delays on an injected clock, priority, prefetch, DLQ."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from brokers import DeliveryAlreadySettled, Envelope, QueueStats, from_url
from brokers.memory import MemoryBroker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def broker(clock: Clock) -> AsyncIterator[MemoryBroker]:
    async with MemoryBroker(clock=clock) as b:
        yield b


def env(i: int | str, queue: str = "q", **kw: object) -> Envelope:
    return Envelope(id=str(i), queue=queue, body=f"b{i}".encode(), **kw)  # type: ignore[arg-type]


async def test_from_url() -> None:
    assert isinstance(from_url("memory://"), MemoryBroker)
    assert isinstance(MemoryBroker.from_url("memory://", namespace="x"), MemoryBroker)
    assert MemoryBroker.capabilities.max_priority == 9


async def test_fifo_within_one_priority(broker: MemoryBroker) -> None:
    await broker.publish_many([env(i) for i in range(5)])
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            got = [await consumer.receive() for _ in range(5)]
    assert [d.envelope.id for d in got] == ["0", "1", "2", "3", "4"]
    assert all(d.delivery_count == 1 for d in got)
    assert got[0].envelope.body == b"b0"


async def test_higher_priority_first_across_queues(broker: MemoryBroker) -> None:
    await broker.publish(env("low", "a", priority=1))
    await broker.publish(env("high", "b", priority=9))
    await broker.publish(env("mid", "a", priority=5))
    await broker.publish(env("mid2", "b", priority=5))
    with anyio.fail_after(5):
        async with broker.consume(["a", "b"], prefetch=10) as consumer:
            order = [(await consumer.receive()).envelope.id for _ in range(4)]
    assert order == ["high", "mid", "mid2", "low"]


async def test_delay_is_never_early_on_the_injected_clock(broker: MemoryBroker, clock: Clock) -> None:
    await broker.publish(env("later", delay_s=10.0))
    await broker.publish(env("now"))
    assert await broker.stats("q") == QueueStats(ready=1, delayed=1)
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            first = await consumer.receive()
            assert first.envelope.id == "now"
            clock.now += 9.999
            await first.ack()
            await broker.publish(env("now2"))
            assert (await consumer.receive()).envelope.id == "now2"
            clock.now += 0.001
            assert (await consumer.receive()).envelope.id == "later"


async def test_nack_with_delay_hides_the_message(broker: MemoryBroker, clock: Clock) -> None:
    await broker.publish(env(1))
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            d = await consumer.receive()
            await d.nack(delay_s=5.0)
            assert await broker.stats("q") == QueueStats(delayed=1)
            clock.now += 5.0
            again = await consumer.receive()
    assert again.envelope == d.envelope
    assert again.delivery_count == 2


async def test_ack_removes_and_dead_letter_keeps_the_reason(broker: MemoryBroker) -> None:
    await broker.publish_many([env(1), env(2)])
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            a, b = await consumer.receive(), await consumer.receive()
            assert (await broker.stats("q")).in_flight == 2
            await a.ack()
            await b.dead_letter("decode_error")
    assert await broker.stats("q") == QueueStats(dead=1)
    [dead] = await broker.dead_letters("q")
    assert (dead.envelope.id, dead.reason, dead.delivery_count) == ("2", "decode_error", 1)


async def test_settling_twice(broker: MemoryBroker) -> None:
    await broker.publish(env(1))
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            d = await consumer.receive()
            await d.ack()
            await d.ack()  # same verb: a no-op
            with pytest.raises(DeliveryAlreadySettled, match="ack"):
                await d.nack()
            with pytest.raises(DeliveryAlreadySettled):
                await d.dead_letter("x")
    assert await broker.stats("q") == QueueStats()


async def test_prefetch_bounds_unsettled_deliveries(broker: MemoryBroker) -> None:
    await broker.publish_many([env(i) for i in range(5)])
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=2) as consumer:
            a, _b = await consumer.receive(), await consumer.receive()
            third: list[str] = []

            async def take() -> None:
                third.append((await consumer.receive()).envelope.id)

            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                await anyio.wait_all_tasks_blocked()
                assert third == []  # held back while two are unsettled
                assert await broker.stats("q") == QueueStats(ready=3, in_flight=2)
                await a.ack()
            assert third == ["2"]


async def test_closing_the_consumer_hands_unsettled_back(broker: MemoryBroker) -> None:
    await broker.publish_many([env(1), env(2)])
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            d1 = await consumer.receive()
            await consumer.receive()
            await d1.ack()
        assert await broker.stats("q") == QueueStats(ready=1)
        async with broker.consume(["q"], prefetch=10) as consumer:
            again = await consumer.receive()
    assert (again.envelope.id, again.delivery_count) == ("2", 2)


async def test_a_stale_delivery_cannot_be_settled_after_release(broker: MemoryBroker) -> None:
    await broker.publish(env(1))
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer:
            d = await consumer.receive()
        await d.ack()  # released already: ignored, the message stays queued
    assert await broker.stats("q") == QueueStats(ready=1)


async def test_receive_after_close_ends_the_stream(broker: MemoryBroker) -> None:
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=1) as consumer:
            await consumer.aclose()
            await consumer.aclose()  # idempotent
            with pytest.raises(anyio.EndOfStream):
                await consumer.receive()
            assert [d async for d in consumer] == []


async def test_closing_the_broker_wakes_a_waiting_consumer(broker: MemoryBroker) -> None:
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=1) as consumer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(broker.__aexit__, None, None, None)
                with pytest.raises(anyio.EndOfStream):
                    await consumer.receive()


async def test_async_iteration_and_late_publish(broker: MemoryBroker) -> None:
    got: list[str] = []
    with anyio.fail_after(5):
        async with broker.consume(["q"], prefetch=10) as consumer, anyio.create_task_group() as tg:

            async def read() -> None:
                async for d in consumer:
                    got.append(d.envelope.id)
                    await d.ack()
                    if len(got) == 3:
                        return

            tg.start_soon(read)
            for i in range(3):
                await broker.publish(env(i))
    assert got == ["0", "1", "2"]


async def test_purge_and_stats(broker: MemoryBroker) -> None:
    await broker.publish_many([env(1), env(2), env(3, delay_s=60)])
    await broker.declare("q")  # idempotent
    assert await broker.stats("q") == QueueStats(ready=2, delayed=1)
    assert await broker.purge("q") == 3
    assert await broker.stats("q") == QueueStats()
    assert await broker.stats("never-used") == QueueStats()


async def test_bad_prefetch_is_refused(broker: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        async with broker.consume(["q"], prefetch=0):
            pass
