"""Leases: dead consumers' deliveries are reclaimed, live ones are kept, and the
delivery limit dead-letters what keeps coming back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.contract.helpers import WAIT_S, assert_nothing_arrives, env, recv
from tests.redis.conftest import MakeBroker, url_with

pytestmark = pytest.mark.redis

GROUP = "taskloom"


async def ghost_takes(raw: aioredis.Redis, broker: Any, queue: str, *, idle_ms: int) -> bytes:
    """Simulate a consumer that read one entry and died: read it as 'ghost' and
    set the entry's idle time as if the ghost had been silent for ``idle_ms``."""
    await broker.declare(queue)
    stream = broker._queue(queue).streams[0]
    [[_, [(entry_id, _)]]] = await raw.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
    await raw.xclaim(stream, GROUP, "ghost", 0, [entry_id], idle=idle_ms, justid=True)
    return bytes(entry_id)


async def test_deliveries_of_a_killed_consumer_are_reclaimed(
    make_broker: MakeBroker, namespace: str
) -> None:
    broker = await make_broker(lease_s=0.5)
    await broker.publish(env("jobs", "m1"))
    code = textwrap.dedent(f"""
        import anyio, sys
        from brokers.redis import RedisBroker
        async def main():
            async with RedisBroker.from_url({url_with(lease_s=0.5)!r},
                                            namespace={namespace!r}) as broker:
                async with broker.consume(["jobs"], prefetch=1) as consumer:
                    delivery = await consumer.receive()
                    print(delivery.envelope.id, delivery.delivery_count, flush=True)
                    await anyio.sleep_forever()
        anyio.run(main)
    """)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            assert child.stdout is not None
            with anyio.fail_after(30):
                line = await anyio.to_thread.run_sync(child.stdout.readline)
            assert line.split() == ["m1", "1"]
        finally:
            child.kill()  # SIGKILL: no aclose, no release; only the lease expires
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        with anyio.fail_after(WAIT_S):
            delivery = await consumer.receive()
        assert (delivery.envelope.id, delivery.delivery_count) == ("m1", 2)
        await delivery.ack()
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.in_flight) == (0, 0)


async def test_stale_entry_of_a_dead_consumer_is_reclaimed_with_its_count(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker(lease_s=1)
    await broker.publish(env("jobs", "m1", b"body", headers={"h": "v"}))
    await ghost_takes(raw, broker, "jobs", idle_ms=60_000)
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=1) as consumer:
            delivery = await recv(consumer)
            assert delivery.envelope == env("jobs", "m1", b"body", headers={"h": "v"})
            assert delivery.delivery_count == 2
            await delivery.ack()
    assert any("reclaimed" in e["event"] for e in logs)
    assert (await broker.stats("jobs")).in_flight == 0


@pytest.mark.slow
async def test_long_task_of_a_live_consumer_is_not_reclaimed(make_broker: MakeBroker) -> None:
    # The heartbeat runs every lease/3 and a reclaim takes an entry idle for a lease,
    # so a stall of 2/3 of a lease on the loaded CI machine would (rightly) reclaim it:
    # 3 s tolerates a 2 s stall. The test watches two leases while the task "runs".
    lease = 3.0
    worker = await make_broker(lease_s=lease)
    other = await make_broker(lease_s=lease)
    await worker.publish(env("jobs", "long"))
    async with worker.consume(["jobs"], prefetch=1) as busy:
        delivery = await recv(busy)
        async with other.consume(["jobs"], prefetch=1) as idle:
            # two leases pass while the task "runs"; the heartbeat keeps it
            await assert_nothing_arrives(idle, within=2 * lease)
        await delivery.ack()
    async with other.consume(["jobs"], prefetch=1) as idle:
        await assert_nothing_arrives(idle)


async def test_extend_renews_the_lease_at_once(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "m1"))
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        delivery = await recv(consumer)
        stream = broker._queue("jobs").streams[0]
        # make the entry look idle for a minute, as if the heartbeat had stalled
        await raw.xclaim(stream, GROUP, consumer.name, 0, [delivery._id], idle=60_000,
                         justid=True)
        await delivery.extend()
        [pending] = await raw.xpending_range(stream, GROUP, "-", "+", 1)
        assert pending["time_since_delivered"] < 60_000
        assert pending["times_delivered"] == 1  # a heartbeat is not a delivery
        await delivery.ack()


async def test_nacked_message_past_max_deliveries_is_dead_lettered(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(max_deliveries=2)
    await broker.publish(env("jobs", "poison"))
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        first = await recv(consumer)
        await first.nack()
        second = await recv(consumer)
        assert second.delivery_count == 2
        await second.nack()
        await assert_nothing_arrives(consumer)
    [dead] = await broker.dead_letters("jobs")
    assert (dead.envelope.id, dead.reason, dead.delivery_count) == ("poison", "delivery_limit", 3)
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 1)


async def test_reclaimed_message_past_max_deliveries_is_dead_lettered(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker(max_deliveries=1)
    await broker.publish(env("jobs", "crashes-workers"))
    await ghost_takes(raw, broker, "jobs", idle_ms=60_000)
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        await consumer._reclaim()
        await assert_nothing_arrives(consumer)
    [dead] = await broker.dead_letters("jobs")
    assert (dead.envelope.id, dead.reason, dead.delivery_count) == (
        "crashes-workers", "delivery_limit", 2)


async def test_released_deliveries_count_towards_the_limit(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_deliveries=2)
    await broker.publish(env("jobs", "m1"))
    for _ in range(2):
        async with broker.consume(["jobs"], prefetch=1) as consumer:
            await recv(consumer)  # then closed unsettled: released, count + 1
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        await assert_nothing_arrives(consumer)
    [dead] = await broker.dead_letters("jobs")
    assert (dead.reason, dead.delivery_count) == ("delivery_limit", 3)


async def test_unlimited_deliveries_with_max_deliveries_zero(make_broker: MakeBroker) -> None:
    broker = await make_broker(max_deliveries=0)
    await broker.publish(env("jobs", "m1"))
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        for expected in range(1, 8):
            delivery = await recv(consumer)
            assert delivery.delivery_count == expected
            await delivery.nack()
        await (await recv(consumer)).ack()
    assert await broker.dead_letters("jobs") == []


async def test_entry_deleted_while_pending_is_reported_as_lost(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "trimmed"))
    entry_id = await ghost_takes(raw, broker, "jobs", idle_ms=60_000)
    await raw.xdel(broker._queue("jobs").streams[0], entry_id)  # e.g. a careless XTRIM
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=1) as consumer:
            await consumer._reclaim()
            await assert_nothing_arrives(consumer)
    [lost] = [e for e in logs if "deleted from the stream" in e["event"]]
    assert lost["log_level"] == "error"
    assert lost["entries"] == [entry_id.decode()]


async def test_closed_consumer_leaves_the_group(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "m1"))
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        await recv(consumer)
        stream = broker._queue("jobs").streams[0]
        names = [c["name"] for c in await raw.xinfo_consumers(stream, GROUP)]
        assert consumer.name.encode() in names or consumer.name in names
    assert await raw.xinfo_consumers(stream, GROUP) == []
