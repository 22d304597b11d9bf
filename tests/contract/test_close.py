"""Closing and cancelling consumers: stop fetching, hand unsettled deliveries back."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.contract.helpers import WAIT_S, env, recv, recv_n


@pytest.mark.promise(3, 7)
async def test_unsettled_delivery_is_redelivered_when_its_consumer_closes(
    broker: Any, queue: str
) -> None:
    await broker.publish_many([env(queue, "acked"), env(queue, "dropped")])
    async with broker.consume([queue], prefetch=2) as consumer:
        by_id = {d.envelope.id: d for d in await recv_n(consumer, 2)}
        await by_id["acked"].ack()
    async with broker.consume([queue], prefetch=2) as consumer:
        again = await recv(consumer)
        assert (again.envelope.id, again.delivery_count) == ("dropped", 2)
        await again.ack()
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight) == (0, 0)


@pytest.mark.promise(3, 7)
async def test_prefetched_deliveries_come_back_when_the_consumer_closes(
    broker: Any, queue: str
) -> None:
    ids = {f"m{i}" for i in range(5)}
    await broker.publish_many([env(queue, i) for i in sorted(ids)])
    async with broker.consume([queue], prefetch=5) as consumer:
        received = await recv(consumer)
    async with broker.consume([queue], prefetch=5) as consumer:
        again = await recv_n(consumer, 5)
        assert {d.envelope.id for d in again} == ids
        for d in again:
            assert d.delivery_count >= 1
            if d.envelope.id == received.envelope.id:
                assert d.delivery_count == 2
            await d.ack()


@pytest.mark.promise(3, 7)
async def test_cancelling_a_consumer_returns_its_deliveries(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1"))
    holding = anyio.Event()

    async def hold() -> None:
        async with broker.consume([queue], prefetch=1) as consumer:
            await recv(consumer)
            holding.set()
            await anyio.sleep_forever()

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await holding.wait()
            tg.cancel_scope.cancel()
    async with broker.consume([queue], prefetch=1) as consumer:
        again = await recv(consumer)
        assert (again.envelope.id, again.delivery_count) == ("m1", 2)
        await again.ack()


@pytest.mark.promise(7)
async def test_cancelling_a_waiting_receive_leaves_the_consumer_usable(
    broker: Any, queue: str
) -> None:
    async with broker.consume([queue], prefetch=1) as consumer:
        with anyio.move_on_after(0.05):
            await consumer.receive()
        await broker.publish(env(queue, "m1"))
        delivery = await recv(consumer)
        assert delivery.envelope.id == "m1"
        await delivery.ack()


@pytest.mark.promise(7)
async def test_closed_consumer_ends_its_stream(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        await consumer.aclose()
        await consumer.aclose()  # idempotent
        with pytest.raises(anyio.EndOfStream):
            await consumer.receive()
        assert [d async for d in consumer] == []
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        assert delivery.envelope.id == "m1"
        await delivery.ack()


@pytest.mark.promise(7)
async def test_receive_blocked_on_an_empty_queue_ends_when_closed(
    broker: Any, queue: str
) -> None:
    async with broker.consume([queue], prefetch=1) as consumer:
        with anyio.fail_after(WAIT_S):
            async with anyio.create_task_group() as tg:
                ended = anyio.Event()

                async def wait() -> None:
                    with pytest.raises(anyio.EndOfStream):
                        await consumer.receive()
                    ended.set()

                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                await consumer.aclose()
                await ended.wait()


@pytest.mark.promise(7)
async def test_closing_while_messages_keep_arriving_strands_none(broker: Any, queue: str) -> None:
    """Closing stops fetching first, then hands back what is unsettled: messages
    published while the consumer closes end either settled or ready, none stays in
    flight with a consumer that is gone."""
    await broker.publish_many([env(queue, f"a{i}") for i in range(20)])
    acked = 0
    async with anyio.create_task_group() as tg:
        async def keep_publishing() -> None:
            for i in range(40):
                await broker.publish(env(queue, f"b{i}"))

        async with broker.consume([queue], prefetch=5) as consumer:
            tg.start_soon(keep_publishing)
            for _ in range(10):
                await (await recv(consumer)).ack()
                acked += 1
        # the consumer is closed while the publisher may still run
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight) == (60 - acked, 0)
    ids = set()
    async with broker.consume([queue], prefetch=10) as consumer:
        for _ in range(60 - acked):
            delivery = await recv(consumer)
            ids.add(delivery.envelope.id)
            await delivery.ack()
    assert len(ids) == 60 - acked  # each of the others once, none lost
