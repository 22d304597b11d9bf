"""Consumer behaviour specific to the AMQP broker: merged acks, errors of the block."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp


async def test_acks_in_any_order_all_count_and_nothing_comes_back(
    make_broker: MakeBroker
) -> None:
    """Acks are merged (one multiple ack for a settled prefix, single acks above a
    gap); whatever the order, every acked message is gone for good."""
    broker = await make_broker()
    n = 300
    await broker.publish_many([Envelope(id=f"m{i}", queue="jobs", body=b"x")
                               for i in range(n)])
    rng = random.Random(7)
    async with broker.consume(["jobs"], prefetch=50) as consumer:
        held: list = []
        seen = set()
        with anyio.fail_after(30):
            while len(seen) < n:
                delivery = await consumer.receive()
                seen.add(delivery.envelope.id)
                held.append(delivery)
                if len(held) >= 20:  # settle a random half, keep the rest held
                    rng.shuffle(held)
                    done, held = held[:10], held[10:]
                    for d in done:
                        await d.ack()
                    await anyio.lowlevel.checkpoint()
            for d in held:
                await d.ack()
    assert (await broker.stats("jobs")).ready == 0
    async with broker.consume(["jobs"], prefetch=50) as consumer:
        with anyio.move_on_after(0.3):
            delivery = await consumer.receive()
            pytest.fail(f"{delivery.envelope.id} came back after it was acked")


async def test_an_error_in_the_consume_block_comes_out_as_it_is(
    make_broker: MakeBroker
) -> None:
    broker = await make_broker()
    with pytest.raises(KeyError):
        async with broker.consume(["jobs"], prefetch=1):
            raise KeyError("mine")


async def test_a_consumer_of_several_quorum_queues_splits_its_prefetch(
    make_broker: MakeBroker
) -> None:
    broker = await make_broker(queue_type="quorum")
    await broker.publish_many([Envelope(id=f"{q}{i}", queue=q, body=b"x")
                               for q in ("a", "b") for i in range(4)])
    async with broker.consume(["a", "b"], prefetch=4) as consumer:
        got = []
        with anyio.fail_after(5):
            for _ in range(4):
                got.append(await consumer.receive())
        with anyio.move_on_after(0.3):
            extra = await consumer.receive()
            pytest.fail(f"more than prefetch unsettled: {extra.envelope.id}")
        assert {d.envelope.queue for d in got} == {"a", "b"}
        for d in got:
            await d.ack()
