"""Stats and purge."""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.helpers import assert_nothing_arrives, env, recv


@pytest.mark.promise(4)
async def test_stats_count_ready_delayed_in_flight_and_dead(broker: Any, queue: str) -> None:
    await broker.declare(queue)
    assert await broker.stats(queue) == type(await broker.stats(queue))()
    await broker.publish_many([env(queue, f"m{i}") for i in range(4)])
    await broker.publish(env(queue, "later", delay_s=60.0))
    async with broker.consume([queue], prefetch=2) as consumer:
        first, second = await recv(consumer), await recv(consumer)
        stats = await broker.stats(queue)
        assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (2, 1, 2, 0)
        await first.dead_letter("x")
        await second.ack()
    stats = await broker.stats(queue)
    assert (stats.ready, stats.delayed, stats.in_flight, stats.dead) == (2, 1, 0, 1)


async def test_purge_drops_ready_and_delayed_but_not_in_flight_or_dead(
    broker: Any, queue: str
) -> None:
    await broker.publish_many([env(queue, f"m{i}") for i in range(3)])
    async with broker.consume([queue], prefetch=1) as consumer:
        held = await recv(consumer)
        await broker.publish(env(queue, "later", delay_s=60.0))
        await broker.publish(env(queue, "dead"))
        assert await broker.purge(queue) == 4
        stats = await broker.stats(queue)
        assert (stats.ready, stats.delayed, stats.in_flight) == (0, 0, 1)
        await held.ack()
        await assert_nothing_arrives(consumer)
    assert await broker.purge(queue) == 0


async def test_purge_keeps_dead_letters(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        await (await recv(consumer)).dead_letter("poison")
    await broker.purge(queue)
    assert [d.envelope.id for d in await broker.dead_letters(queue)] == ["m1"]
    assert (await broker.stats(queue)).dead == 1


async def test_purge_of_an_unknown_queue_is_zero(broker: Any) -> None:
    assert await broker.purge("never-used") == 0
