"""Promise 9: among ready messages of one queue, a higher priority is delivered first
where ``capabilities.max_priority > 0``; elsewhere priority is ignored (publish order).

Every test asserts on every broker: a broker without priorities (AMQP with quorum
queues on RabbitMQ 3.x) must deliver in publish order, it does not skip."""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.helpers import env, recv

pytestmark = pytest.mark.promise(9)


def expected(broker: Any, published: list[tuple[str, int]]) -> list[str]:
    """The ids in the order promise 9 requires for this broker."""
    if broker.capabilities.max_priority == 0:  # ignored: publish order
        return [id for id, _ in published]
    # highest first; ties in publish order (sorted() is stable)
    return [id for id, _ in sorted(published, key=lambda m: -m[1])]


@pytest.mark.parametrize("prefetch", [1, 10])
async def test_higher_priority_is_delivered_first(broker: Any, queue: str, prefetch: int) -> None:
    top = broker.capabilities.max_priority or 9
    published = [(f"m{i}", p) for i, p in enumerate([0, 3, top, 1, 5, 0, top])]
    for id, p in published:
        await broker.publish(env(queue, id, priority=p))
    async with broker.consume([queue], prefetch=prefetch) as consumer:
        got = []
        for _ in published:
            d = await recv(consumer)
            got.append(d.envelope.id)
            await d.ack()
    assert got == expected(broker, published)


async def test_priority_of_publish_many(broker: Any, queue: str) -> None:
    published = [("low", 0), ("high", 2), ("mid", 1)]
    await broker.publish_many([env(queue, id, priority=p) for id, p in published])
    async with broker.consume([queue], prefetch=1) as consumer:
        got = []
        for _ in range(3):
            d = await recv(consumer)
            got.append(d.envelope.id)
            await d.ack()
    assert got == expected(broker, published)


async def test_priority_is_kept_on_nack(broker: Any, queue: str) -> None:
    published = [("low", 0), ("high", 5)]
    await broker.publish_many([env(queue, id, priority=p) for id, p in published])
    first_id = expected(broker, published)[0]
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await recv(consumer)
        assert first.envelope.id == first_id
        await first.nack()
        if broker.capabilities.max_priority == 0:
            return  # no priority to keep; the order above is what promise 9 asks
        again = await recv(consumer)
        assert (again.envelope.id, again.envelope.priority) == ("high", 5)
        await again.ack()
