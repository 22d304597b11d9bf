"""Settling: ack removes, nack requeues, settling is exactly once."""

from __future__ import annotations

from typing import Any

import pytest

from brokers.base import DeliveryAlreadySettled
from tests.contract.helpers import assert_nothing_arrives, env, open_client, recv, recv_n


@pytest.mark.promise(4)
async def test_ack_removes_the_message(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        await delivery.ack()
        stats = await broker.stats(queue)
        assert (stats.ready, stats.in_flight, stats.delayed, stats.dead) == (0, 0, 0, 0)
    async with broker.consume([queue], prefetch=1) as consumer:
        await assert_nothing_arrives(consumer)


@pytest.mark.promise(3)
async def test_nack_requeues_with_delivery_count_plus_one(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1", b"payload", headers={"k": "v"}))
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await recv(consumer)
        assert first.delivery_count == 1
        await first.nack()
        second = await recv(consumer)
        assert second.envelope.id == "m1"
        assert second.envelope.body == b"payload"
        assert second.envelope.headers == {"k": "v"}
        assert second.delivery_count == 2
        await second.nack()
        third = await recv(consumer)
        assert third.delivery_count == 3
        await third.ack()


@pytest.mark.promise(4)
async def test_settling_twice_with_the_same_verb_is_a_no_op(broker: Any, queue: str) -> None:
    await broker.publish_many([env(queue, "acked"), env(queue, "nacked"), env(queue, "dead")])
    async with broker.consume([queue], prefetch=3) as consumer:
        by_id = {}
        for _ in range(3):
            d = await recv(consumer)
            by_id[d.envelope.id] = d
        await by_id["acked"].ack()
        await by_id["acked"].ack()
        await by_id["dead"].dead_letter("bad")
        await by_id["dead"].dead_letter("bad")
        await by_id["nacked"].nack()
        await by_id["nacked"].nack()
        again = await recv(consumer)
        assert (again.envelope.id, again.delivery_count) == ("nacked", 2)
        await again.ack()
        await assert_nothing_arrives(consumer)
    assert len(await broker.dead_letters(queue)) == 1


@pytest.mark.parametrize(("first", "second"), [
    ("ack", "nack"), ("ack", "dead_letter"), ("nack", "ack"), ("dead_letter", "ack"),
    ("nack", "dead_letter"), ("dead_letter", "nack"),
])
@pytest.mark.promise(4)
async def test_settling_with_another_verb_raises(
    broker: Any, queue: str, first: str, second: str
) -> None:
    async def settle(delivery: Any, verb: str) -> None:
        if verb == "dead_letter":
            await delivery.dead_letter("reason")
        else:
            await getattr(delivery, verb)()

    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        await settle(delivery, first)
        with pytest.raises(DeliveryAlreadySettled):
            await settle(delivery, second)
        if first == "nack":  # the first verb stands: back in the queue, not dead
            await (await recv(consumer)).ack()
        await assert_nothing_arrives(consumer)
    dead = await broker.dead_letters(queue)
    assert [d.envelope.id for d in dead] == (["m1"] if first == "dead_letter" else [])


@pytest.mark.promise(3)
async def test_extend_keeps_the_delivery(broker: Any, queue: str) -> None:
    """extend() neither settles nor redelivers: the message stays held by its
    consumer (in flight, offered to no one else), and a heartbeat is not a delivery
    (after a nack it comes back with delivery_count 2, not more)."""
    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        for _ in range(3):
            await delivery.extend()
        stats = await broker.stats(queue)
        assert (stats.ready, stats.in_flight) == (0, 1)
        async with broker.consume([queue], prefetch=1) as other:
            await assert_nothing_arrives(other)
        await delivery.nack()
        again = await recv(consumer)
        assert (again.envelope.id, again.delivery_count) == ("m1", 2)
        await again.extend()
        await again.ack()
        await again.extend()  # settled: nothing to keep, not an error
        await delivery.extend()
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight) == (0, 0)


@pytest.mark.promise(4)
async def test_settlements_reach_the_server_before_aclose_returns(
    broker: Any, queue: str, broker_kind: str
) -> None:
    """A broker may batch settlements, but closing it flushes them: another client
    then sees every ack and dead letter, and nothing is redelivered."""
    await broker.publish_many([env(queue, f"m{i}") for i in range(20)])
    client = broker if broker_kind == "memory" else await open_client(broker, broker_kind)
    async with client.consume([queue], prefetch=20) as consumer:
        for d in await recv_n(consumer, 20):
            if d.envelope.id == "m7":
                await d.dead_letter("bad")
            else:
                await d.ack()
    if client is not broker:
        await client.__aexit__(None, None, None)  # at once: no time for a lazy flush
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 1)
    async with broker.consume([queue], prefetch=1) as consumer:
        await assert_nothing_arrives(consumer)
