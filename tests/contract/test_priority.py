"""Priorities: higher first among ready messages, where the broker has them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.helpers import env, recv


def needs_priorities(broker: Any) -> None:
    if broker.capabilities.max_priority == 0:
        pytest.skip(f"{type(broker).__name__} has no priorities")


@pytest.mark.parametrize("prefetch", [1, 10])
async def test_higher_priority_is_delivered_first(broker: Any, queue: str, prefetch: int) -> None:
    needs_priorities(broker)
    top = broker.capabilities.max_priority
    priorities = [0, 3, top, 1, 5, 0, top]
    for i, p in enumerate(priorities):
        await broker.publish(env(queue, f"m{i}", priority=p))
    async with broker.consume([queue], prefetch=prefetch) as consumer:
        got = []
        for _ in priorities:
            d = await recv(consumer)
            got.append(d.envelope.priority)
            await d.ack()
    assert got == sorted(priorities, reverse=True)


async def test_priority_of_publish_many(broker: Any, queue: str) -> None:
    needs_priorities(broker)
    await broker.publish_many([env(queue, "low"), env(queue, "high", priority=2),
                               env(queue, "mid", priority=1)])
    async with broker.consume([queue], prefetch=1) as consumer:
        got = []
        for _ in range(3):
            d = await recv(consumer)
            got.append(d.envelope.id)
            await d.ack()
    assert got == ["high", "mid", "low"]


async def test_priority_is_kept_on_nack(broker: Any, queue: str) -> None:
    needs_priorities(broker)
    await broker.publish_many([env(queue, "low"), env(queue, "high", priority=5)])
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await recv(consumer)
        assert first.envelope.id == "high"
        await first.nack()
        again = await recv(consumer)
        assert (again.envelope.id, again.envelope.priority) == ("high", 5)
        await again.ack()
