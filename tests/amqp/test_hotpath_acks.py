"""Acks written by hand (``ack_bytes``) are the bytes pamqp would write, and RabbitMQ
takes them: every acked message is gone, nothing else is."""

from __future__ import annotations

import anyio
import pamqp.frame
import pytest
from pamqp.commands import Basic

from brokers.amqp._aiormq import ack_bytes
from brokers.base import Envelope
from tests.amqp.conftest import MakeBroker

pytestmark = pytest.mark.amqp


def test_ack_frames_are_the_bytes_pamqp_writes() -> None:
    frames = [Basic.Ack(delivery_tag=7, multiple=True), Basic.Ack(delivery_tag=9),
              Basic.Ack(delivery_tag=2**63 - 1), Basic.Ack(delivery_tag=1, multiple=False)]
    for channel in (1, 2, 65535):
        assert ack_bytes(channel, frames) == b"".join(
            pamqp.frame.marshal(f, channel) for f in frames)
    assert ack_bytes(1, []) == b""


async def test_acked_messages_are_gone_and_held_ones_come_back(make_broker: MakeBroker) -> None:
    """Single acks above a held delivery, then a multiple ack once it is settled."""
    broker = await make_broker()
    await broker.publish_many([Envelope(id=f"m{i}", queue="jobs", body=b"x") for i in range(6)])
    async with broker.consume(["jobs"], prefetch=6) as consumer:
        with anyio.fail_after(30):
            deliveries = [await consumer.receive() for _ in range(6)]
        for d in deliveries[2:]:  # m0 and m1 held: single acks for m2..m5
            await d.ack()
        await deliveries[0].ack()  # m1 still held: a multiple ack up to m0 at most
    # closing sent the acks made and handed m1 back
    async with broker.consume(["jobs"], prefetch=6) as consumer:
        with anyio.fail_after(30):
            back = await consumer.receive()
        assert back.envelope.id == "m1"
        await back.ack()
    assert (await broker.stats("jobs")).ready == 0
