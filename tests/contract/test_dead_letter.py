"""Dead-lettering: kept with its reason, never back by itself."""

from __future__ import annotations

from typing import Any

import pytest

from tests.contract.helpers import assert_nothing_arrives, env, recv

pytestmark = pytest.mark.promise(6)


async def test_dead_letter_keeps_reason_and_never_returns(broker: Any, queue: str) -> None:
    body = b"\x00poison\xff"
    await broker.publish(env(queue, "bad", body, headers={"task": "t"}))
    await broker.publish(env(queue, "good"))
    async with broker.consume([queue], prefetch=2) as consumer:
        for _ in range(2):
            d = await recv(consumer)
            if d.envelope.id == "bad":
                await d.dead_letter("decode_error")
            else:
                await d.ack()
        await assert_nothing_arrives(consumer)
    [dead] = await broker.dead_letters(queue)
    assert dead.reason == "decode_error"
    assert dead.delivery_count == 1
    assert (dead.envelope.id, dead.envelope.body, dead.envelope.headers) == (
        "bad", body, {"task": "t"})
    stats = await broker.stats(queue)
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 1)
    async with broker.consume([queue], prefetch=1) as consumer:
        await assert_nothing_arrives(consumer)


async def test_dead_letter_after_redelivery_counts_deliveries(broker: Any, queue: str) -> None:
    await broker.publish(env(queue, "m1"))
    async with broker.consume([queue], prefetch=1) as consumer:
        await (await recv(consumer)).nack()
        await (await recv(consumer)).dead_letter("unknown_task")
    [dead] = await broker.dead_letters(queue)
    assert (dead.reason, dead.delivery_count) == ("unknown_task", 2)


async def test_dead_letters_are_oldest_first_and_limited(broker: Any, queue: str) -> None:
    for i in range(3):
        await broker.publish(env(queue, f"m{i}"))
    async with broker.consume([queue], prefetch=1) as consumer:
        for _ in range(3):
            d = await recv(consumer)
            await d.dead_letter(f"reason-{d.envelope.id}")
    dead = await broker.dead_letters(queue)
    assert [d.envelope.id for d in dead] == ["m0", "m1", "m2"]
    assert [d.reason for d in dead] == ["reason-m0", "reason-m1", "reason-m2"]
    assert [d.envelope.id for d in await broker.dead_letters(queue, limit=2)] == ["m0", "m1"]


async def test_dead_letters_of_an_unknown_queue_is_empty(broker: Any) -> None:
    assert await broker.dead_letters("never-used") == []
