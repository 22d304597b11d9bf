"""Delays: never early."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.contract.helpers import DELAY_S, env, recv

pytestmark = pytest.mark.promise(5)


async def test_publish_with_delay_is_not_early(broker: Any, queue: str) -> None:
    start = anyio.current_time()
    await broker.publish(env(queue, "later", delay_s=DELAY_S))
    await broker.publish(env(queue, "now"))
    assert (await broker.stats(queue)).delayed == 1
    async with broker.consume([queue], prefetch=2) as consumer:
        first = await recv(consumer)
        assert first.envelope.id == "now"
        await first.ack()
        second = await recv(consumer)
        assert second.envelope.id == "later"
        assert anyio.current_time() - start >= DELAY_S
        assert second.delivery_count == 1
        await second.ack()


async def test_publish_many_with_delay_is_not_early(broker: Any, queue: str) -> None:
    start = anyio.current_time()
    await broker.publish_many([env(queue, "later", delay_s=DELAY_S), env(queue, "now")])
    async with broker.consume([queue], prefetch=2) as consumer:
        assert (await recv(consumer)).envelope.id == "now"
        later = await recv(consumer)
        assert later.envelope.id == "later"
        assert anyio.current_time() - start >= DELAY_S


async def test_delayed_publish_while_consuming_is_not_early(broker: Any, queue: str) -> None:
    async with broker.consume([queue], prefetch=1) as consumer:
        start = anyio.current_time()
        await broker.publish(env(queue, "later", delay_s=DELAY_S))
        delivery = await recv(consumer)
        assert delivery.envelope.id == "later"
        assert anyio.current_time() - start >= DELAY_S
        await delivery.ack()


async def test_nack_with_delay_is_not_early(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1", b"body", headers={"h": "1"}))
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await recv(consumer)
        start = anyio.current_time()
        await first.nack(delay_s=DELAY_S)
        stats = await broker.stats(queue)
        assert (stats.delayed, stats.in_flight) == (1, 0)
        again = await recv(consumer)
        assert anyio.current_time() - start >= DELAY_S
        assert (again.envelope.id, again.envelope.body) == ("m1", b"body")
        assert again.envelope.headers == {"h": "1"}
        assert again.delivery_count == 2
        await again.ack()


async def test_delayed_message_does_not_hold_up_ready_ones(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "slow", delay_s=60.0))
    await broker.publish(env(queue, "fast"))
    async with broker.consume([queue], prefetch=1) as consumer:
        delivery = await recv(consumer)
        assert delivery.envelope.id == "fast"
        await delivery.ack()
    assert (await broker.stats(queue)).delayed == 1
