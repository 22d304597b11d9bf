"""Prefetch bounds the unsettled deliveries a consumer holds."""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.helpers import assert_nothing_arrives, env, recv, recv_n

pytestmark = pytest.mark.promise(8)


@pytest.mark.parametrize("prefetch", [1, 3])
async def test_consumer_holds_at_most_prefetch_unsettled(
    broker: Any, queue: str, prefetch: int
) -> None:
    await broker.publish_many([env(queue, f"m{i}") for i in range(prefetch + 2)])
    async with broker.consume([queue], prefetch=prefetch) as consumer:
        held = await recv_n(consumer, prefetch)
        await assert_nothing_arrives(consumer)
        await held[0].ack()
        nxt = await recv(consumer)
        await assert_nothing_arrives(consumer)
        for d in [*held[1:], nxt]:
            await d.ack()
        for d in await recv_n(consumer, 1):
            await d.ack()


async def test_nack_frees_a_prefetch_slot(broker: Any, queue: str) -> None:
    await broker.publish_many([env(queue, "a"), env(queue, "b")])
    async with broker.consume([queue], prefetch=1) as consumer:
        first = await recv(consumer)
        await assert_nothing_arrives(consumer)
        await first.nack()
        second = await recv(consumer)
        await second.ack()
        third = await recv(consumer)
        assert {first.envelope.id, second.envelope.id} == {"a", "b"}
        assert third.envelope.id == first.envelope.id
        await third.ack()


async def test_prefetch_below_one_is_rejected(broker: Any, queue: str) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        async with broker.consume([queue], prefetch=0):
            pass
