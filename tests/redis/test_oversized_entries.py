"""Oversized stream entries (issue 10, finding 7): a worker's memory stays bounded
whatever the size of the entries written straight into a stream, and an entry
over the size limit is dead-lettered inside Redis (its bytes never reach the
worker) with the reason ``too_large``.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from brokers.base import Envelope
from brokers.redis import RedisBroker
from tests.contract.helpers import recv
from tests.redis.conftest import MakeBroker

pytestmark = pytest.mark.redis

QUEUE = "big"
MIB = 1024 * 1024


def entry(i: int, size: int) -> bytes:
    return msgspec.msgpack.encode(Envelope(id=f"m{i}", queue=QUEUE, body=b"x" * size))


async def write_raw(raw: aioredis.Redis, broker: RedisBroker, sizes: list[int]) -> None:
    """XADD entries in the broker's own format, bypassing publish()."""
    stream = broker._queue(QUEUE).streams[0]
    for i, size in enumerate(sizes):
        await raw.xadd(stream, {"e": entry(i, size)})


async def pending_of(raw: aioredis.Redis, broker: RedisBroker) -> int:
    summary = await raw.xpending(broker._queue(QUEUE).streams[0], broker.options.group)
    return int(summary["pending"])


async def test_a_consumer_holds_at_most_its_byte_budget_of_large_entries(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    """12 entries of 3 MiB, prefetch 50, a budget of 8 MiB: the consumer fetches
    (and holds in memory) about 8 MiB of them at a time, not all 36 MiB; every
    entry is still delivered once the held ones are settled."""
    broker = await make_broker(fetch_bytes=8 * MIB)
    await broker.declare(QUEUE)
    await write_raw(raw, broker, [3 * MIB] * 12)
    got: list[str] = []
    async with broker.consume([QUEUE], prefetch=50) as consumer:
        first = await recv(consumer)
        got.append(first.envelope.id)
        # a settled state to look at: the fetch loop is idle, waiting for bytes to free
        with anyio.fail_after(10):
            await broker._flush_consumers()
        held = await pending_of(raw, broker)
        assert 1 <= held <= 3, f"the consumer holds {held} entries of 3 MiB (budget 8 MiB)"
        await first.ack()
        while len(got) < 12:
            delivery = await recv(consumer)
            got.append(delivery.envelope.id)
            await delivery.ack()
            assert await pending_of(raw, broker) <= 3
    assert sorted(got) == sorted(f"m{i}" for i in range(12))


async def test_entries_over_the_size_limit_are_dead_lettered_in_redis_as_too_large(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    """Entries over ``max_message_bytes`` go to the dead-letter stream as
    ``too_large`` without being delivered; a small one behind them is delivered."""
    broker = await make_broker(max_message_bytes=MIB)
    assert broker.capabilities.max_message_bytes == MIB  # a bigger runtime limit is refused
    await broker.declare(QUEUE)
    await write_raw(raw, broker, [3 * MIB] * 6 + [100])
    async with broker.consume([QUEUE], prefetch=50) as consumer:
        delivery = await recv(consumer)
        assert delivery.envelope.id == "m6"
        assert len(delivery.envelope.body) == 100
        await delivery.ack()
    dead = await broker.dead_letters(QUEUE)
    assert sorted(d.envelope.id for d in dead) == [f"m{i}" for i in range(6)]
    assert {d.reason for d in dead} == {"too_large"}
    stats = await broker.stats(QUEUE)
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 6)
