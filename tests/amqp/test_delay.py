"""Delays through the TTL cascade: never early, and they arrive."""

from __future__ import annotations

import aio_pika
import anyio
import pytest

from brokers.amqp import DELAY_TICK_S
from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("delays", [(0.3, 1.5), (0.05, 0.7)])
async def test_delayed_messages_are_never_early_and_arrive(
    make_broker: MakeBroker, queue_type: str, delays: tuple[float, ...]
) -> None:
    broker = await make_broker(queue_type=queue_type)
    start = anyio.current_time()
    await broker.publish_many([
        Envelope(id=f"after-{d}", queue="jobs", body=b"x", delay_s=d, priority=1)
        for d in delays])
    assert (await broker.stats("jobs")).delayed == len(delays)
    async with broker.consume(["jobs"], prefetch=len(delays)) as consumer:
        for expected in sorted(delays):
            with anyio.fail_after(expected + 5):
                delivery = await consumer.receive()
            waited = anyio.current_time() - start
            assert delivery.envelope.id == f"after-{expected}"
            assert waited >= expected
            assert delivery.delivery_count == 1
            await delivery.ack()
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.delayed) == (0, 0)


async def test_a_delay_passes_only_the_levels_of_its_bits(
    make_broker: MakeBroker, raw: aio_pika.abc.AbstractChannel, namespace: str
) -> None:
    broker = await make_broker()
    ticks = 0b1010  # waits in level 3 (8 ticks) then level 1 (2 ticks)
    await broker.publish(Envelope(id="m", queue="jobs", body=b"x",
                                  delay_s=ticks * DELAY_TICK_S))
    levels = [await raw.declare_queue(f"{namespace}.jobs.delay.{k:02d}", passive=True)
              for k in range(4)]
    counts = [q.declaration_result.message_count for q in levels]
    assert counts == [0, 0, 0, 1]  # levels 0..3 exist; the message waits in level 3
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        with anyio.fail_after(5):
            delivery = await consumer.receive()
        assert delivery.envelope.id == "m"
        await delivery.ack()


async def test_nack_with_delay_goes_through_the_cascade_with_its_count(
    make_broker: MakeBroker
) -> None:
    broker = await make_broker()
    await broker.publish(Envelope(id="m", queue="jobs", body=b"x", headers={"h": "1"}))
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        counts = []
        nacked_at = None
        for _ in range(3):
            with anyio.fail_after(5):
                delivery = await consumer.receive()
            if nacked_at is not None:
                assert anyio.current_time() - nacked_at >= 0.2
            counts.append(delivery.delivery_count)
            assert delivery.envelope.headers == {"h": "1"}
            if len(counts) < 3:
                nacked_at = anyio.current_time()
                await delivery.nack(delay_s=0.2)
                assert (await broker.stats("jobs")).delayed == 1
            else:
                await delivery.ack()
    assert counts == [1, 2, 3]
