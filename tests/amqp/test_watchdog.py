"""The consumer watchdog (issue 10, finding 3) must not take a busy or idle
consumer for a stalled one: no reconnect while deliveries flow, while the queue
is empty, or while the consumer is full (every delivery held). The stalled case
itself is proven through a TCP proxy in tests/faults/test_amqp_network.py."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from brokers.amqp import AmqpDelivery
from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp

#: Watchdog period of these tests (short, so a few periods pass quickly).
PERIOD = 0.3


def stalls(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e.get("event") == "amqp.consumer_stalled"]


async def test_a_full_consumer_with_ready_messages_is_not_stalled(
    make_broker: MakeBroker
) -> None:
    broker = await make_broker(watchdog_s=PERIOD)
    await broker.publish_many([Envelope(id=f"m{i}", queue="jobs", body=b"x") for i in range(10)])
    held: list[AmqpDelivery] = []
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=2) as consumer:
            with anyio.fail_after(30):
                held += [await consumer.receive(), await consumer.receive()]
            await anyio.sleep(PERIOD * 5)  # several watchdog periods while full
            for d in held:
                await d.ack()
    assert not stalls(logs), logs


async def test_a_full_queue_of_a_split_prefetch_is_not_stalled(
    make_broker: MakeBroker
) -> None:
    """Quorum queues split the prefetch: one queue at its share with ready
    messages, the other empty: the consumer has room, but not for those."""
    broker = await make_broker(watchdog_s=PERIOD, queue_type="quorum")
    await broker.declare("b")
    await broker.publish_many([Envelope(id=f"m{i}", queue="a", body=b"x") for i in range(10)])
    held: list[AmqpDelivery] = []
    with capture_logs() as logs:
        async with broker.consume(["a", "b"], prefetch=4) as consumer:
            with anyio.fail_after(30):
                held += [await consumer.receive(), await consumer.receive()]
            await anyio.sleep(PERIOD * 5)  # several watchdog periods at a's share
            for d in held:
                await d.ack()
    assert not stalls(logs), logs


async def test_an_idle_consumer_of_an_empty_queue_is_not_stalled(
    make_broker: MakeBroker
) -> None:
    broker = await make_broker(watchdog_s=PERIOD)
    await broker.declare("jobs")
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=2):
            await anyio.sleep(PERIOD * 5)
        await broker.publish(Envelope(id="after", queue="jobs", body=b"x"))
        async with broker.consume(["jobs"], prefetch=2) as consumer:
            with anyio.fail_after(30):
                delivery = await consumer.receive()
            await delivery.ack()
    assert delivery.envelope.id == "after"
    assert not stalls(logs), logs
