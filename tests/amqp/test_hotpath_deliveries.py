"""Deliveries read straight from the channel's frame reader (no task per delivery):
whatever their size, they arrive whole, in order, with their headers."""

from __future__ import annotations

import anyio
import pytest

from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp

#: RabbitMQ's default frame_max is 128 KiB: these bodies take 0, 1, 2 and 4 body frames.
SIZES = [0, 1, 131_072, 3 * 131_072 + 7]


async def test_bodies_of_any_size_arrive_whole_and_in_order(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    sent = [Envelope(id=f"m{i}-{size}", queue="jobs",
                     body=bytes((i + j) % 251 for j in range(size)),
                     headers={"tenant": f"t{i}"})
            for i, size in enumerate(SIZES * 3)]
    await broker.publish_many(sent)
    got = []
    async with broker.consume(["jobs"], prefetch=4) as consumer:
        with anyio.fail_after(30):
            while len(got) < len(sent):
                delivery = await consumer.receive()
                got.append((delivery.envelope, delivery.delivery_count))
                await delivery.ack()
    assert [e.id for e, _ in got] == [e.id for e in sent]
    for (envelope, count), want in zip(got, sent, strict=True):
        assert envelope.body == want.body, envelope.id
        assert envelope.headers == want.headers
        assert count == 1
    assert (await broker.stats("jobs")).ready == 0


async def test_deliveries_of_two_queues_on_one_channel_each_reach_the_consumer(
    make_broker: MakeBroker
) -> None:
    """Each consumer tag of the channel has its deliveries handed over."""
    broker = await make_broker()
    await broker.publish_many([Envelope(id=f"a{i}", queue="a", body=b"x") for i in range(50)])
    await broker.publish_many([Envelope(id=f"b{i}", queue="b", body=b"y") for i in range(50)])
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    async with broker.consume(["a", "b"], prefetch=10) as consumer:
        with anyio.fail_after(30):
            while sum(map(len, seen.values())) < 100:
                delivery = await consumer.receive()
                seen[delivery.envelope.queue].add(delivery.envelope.id)
                await delivery.ack()
    assert seen == {"a": {f"a{i}" for i in range(50)}, "b": {f"b{i}" for i in range(50)}}
