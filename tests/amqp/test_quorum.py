"""Quorum queues: a message whose deliveries keep failing is dead-lettered by RabbitMQ
itself at the delivery limit (RELIABILITY D1), with reason ``delivery_limit``."""

from __future__ import annotations

import aio_pika
import anyio
import pytest

from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker, amqp_url

pytestmark = pytest.mark.amqp


async def next_message_of(queue_name: str) -> aio_pika.abc.AbstractIncomingMessage:
    """Wait (push, no polling) for a message on ``queue_name``, then hand it back."""
    async with await aio_pika.connect(amqp_url()) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        async with queue.iterator() as messages:
            async for message in messages:
                await message.nack(requeue=True)
                return message
    raise AssertionError("unreachable")


async def test_a_message_redelivered_past_the_delivery_limit_is_dead_lettered(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker(queue_type="quorum", delivery_limit=2)
    await broker.publish(Envelope(id="poison", queue="jobs", body=b"x", headers={"t": "1"}))
    await broker.publish(Envelope(id="good", queue="jobs", body=b"y"))
    counts = []
    for _ in range(3):  # each consumer dies holding the poison (as a crashing worker)
        async with broker.consume(["jobs"], prefetch=1) as consumer:
            with anyio.fail_after(5):
                delivery = await consumer.receive()
            while delivery.envelope.id != "poison":
                await delivery.ack()
                with anyio.fail_after(5):
                    delivery = await consumer.receive()
            counts.append(delivery.delivery_count)
    assert counts == [1, 2, 3]
    with anyio.fail_after(10):
        dead = await next_message_of(f"{namespace}.jobs.dlq")
    assert dead.message_id == "poison"
    [letter] = await broker.dead_letters("jobs")
    assert letter.reason == "delivery_limit"
    assert letter.delivery_count == 3
    assert (letter.envelope.id, letter.envelope.body, letter.envelope.headers) == (
        "poison", b"x", {"t": "1"})
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.dead) == (1, 1)
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        with anyio.fail_after(5):
            delivery = await consumer.receive()
        assert (delivery.envelope.id, delivery.delivery_count) == ("good", 1)
        await delivery.ack()


async def test_quorum_queues_are_declared_with_an_explicit_limit_and_safe_dead_lettering(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker(queue_type="quorum")
    await broker.declare("jobs")
    arguments = {
        "x-queue-type": "quorum", "x-delivery-limit": 10,
        "x-dead-letter-exchange": f"{namespace}.taskloom.dlx",
        "x-dead-letter-routing-key": f"{namespace}.jobs",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    async with await aio_pika.connect(amqp_url()) as connection:
        # RabbitMQ refuses a declaration whose arguments differ from the queue's (406)
        for name in ("x-delivery-limit", "x-dead-letter-strategy", "x-overflow"):
            other = {k: v for k, v in arguments.items() if k != name}
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match=name):
                await (await connection.channel()).declare_queue(
                    f"{namespace}.jobs", durable=True, arguments=other)
        same = await (await connection.channel()).declare_queue(
            f"{namespace}.jobs", durable=True, arguments=arguments)
        assert same.declaration_result.message_count == 0
