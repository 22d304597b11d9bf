"""Publishing and consuming: what goes in comes out intact."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from brokers.base import Envelope
from tests.contract.helpers import env, recv, recv_n


@pytest.mark.promise(1, 2)
async def test_round_trip_keeps_id_headers_and_body_bytes(broker: Any, queue: str) -> None:
    body = bytes(range(256)) * 8 + b"\x00\r\n"
    headers = {"traceparent": "00-abc-def-01", "content-type": "application/json",
               "unicode": "naïve ☃"}
    await broker.publish(env(queue, "m1", body, headers=headers))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        assert delivery.envelope.id == "m1"
        assert delivery.envelope.queue == queue
        assert delivery.envelope.body == body
        assert delivery.envelope.headers == headers
        assert delivery.delivery_count == 1
        await delivery.ack()


@pytest.mark.promise(1)
async def test_empty_body_round_trips(broker: Any, queue: str) -> None:
    await broker.publish(Envelope(id="empty", queue=queue, body=b""))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        assert (delivery.envelope.id, delivery.envelope.body) == ("empty", b"")
        await delivery.ack()


@pytest.mark.promise(1)
async def test_publish_many_delivers_every_message_once(broker: Any, queue: str) -> None:
    ids = [f"m{i}" for i in range(200)]
    await broker.publish_many([env(queue, i) for i in ids])
    async with broker.consume([queue], prefetch=50) as consumer:
        got = []
        for _ in ids:
            delivery = await recv(consumer)
            assert delivery.envelope.body == delivery.envelope.id.encode()
            got.append(delivery.envelope.id)
            await delivery.ack()
    assert sorted(got) == sorted(ids)
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight) == (0, 0)


async def test_publish_many_of_nothing_is_fine(broker: Any, queue: str) -> None:
    await broker.publish_many([])
    await broker.declare(queue)
    assert (await broker.stats(queue)).ready == 0


@pytest.mark.promise(2)
async def test_declare_is_idempotent(broker: Any, queue: str) -> None:
    await broker.declare(queue)
    await broker.declare(queue)
    await broker.publish(env(queue, "m1"))
    await broker.declare(queue)
    assert (await broker.stats(queue)).ready == 1


@pytest.mark.promise(2)
async def test_consumer_of_several_queues_gets_from_each(broker: Any) -> None:
    await broker.publish(env("a", "from-a"))
    await broker.publish(env("b", "from-b"))
    async with broker.consume(["a", "b"], prefetch=4) as consumer:
        deliveries = await recv_n(consumer, 2)
        assert {d.envelope.id for d in deliveries} == {"from-a", "from-b"}
        assert {d.envelope.queue for d in deliveries} == {"a", "b"}
        for d in deliveries:
            await d.ack()


async def test_consumer_iterates_with_async_for(broker: Any, queue: str) -> None:
    await broker.publish_many([env(queue, "m1"), env(queue, "m2")])
    seen = []
    async with broker.consume([queue], prefetch=2) as consumer:
        async for delivery in consumer:
            seen.append(delivery.envelope.id)
            await delivery.ack()
            if len(seen) == 2:
                break
    assert sorted(seen) == ["m1", "m2"]


async def test_concurrent_receivers_share_one_consumer(broker: Any, queue: str) -> None:
    got: list[str] = []
    async with broker.consume([queue], prefetch=4) as consumer:

        async def take() -> None:
            delivery = await recv(consumer)
            got.append(delivery.envelope.id)
            await delivery.ack()

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()
            await broker.publish_many([env(queue, f"m{i}") for i in range(3)])
    assert sorted(got) == ["m0", "m1", "m2"]
