"""URL options, key layout, connection errors, malformed entries, priorities."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from brokers import from_url
from brokers.base import BrokerError, ConnectionFailed, Envelope, PublishError
from brokers.redis import RedisBroker, RedisBrokerOptions
from tests.contract.helpers import assert_nothing_arrives, env, recv
from tests.redis.conftest import MakeBroker

pytestmark = pytest.mark.redis


def test_url_options_configure_the_broker() -> None:
    broker = RedisBroker.from_url(
        "redis://:secret@localhost:6379/2?lease_s=12.5&max_deliveries=7&block_s=1"
        "&consumer_name=w1&socket_timeout=3", namespace="app")
    assert broker.options == RedisBrokerOptions(lease_s=12.5, max_deliveries=7, block_s=1.0,
                                                consumer_name="w1")
    assert broker.capabilities.lease_s == 12.5
    assert broker.capabilities.max_priority == 9
    assert "lease_s" not in broker.url and "socket_timeout=3" in broker.url
    assert "secret" not in repr(broker)
    assert broker._consumer_name().startswith("w1-")
    assert isinstance(from_url("rediss://example.com:6380/0"), RedisBroker)
    assert isinstance(from_url("unix:///run/redis.sock?db=1"), RedisBroker)


@pytest.mark.parametrize("query", ["lease_s=-1", "max_deliveries=many", "lease_s="])
def test_bad_url_option_is_a_clear_error(query: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis broker option"):
        RedisBroker.from_url(f"redis://localhost/0?{query}")


def test_namespace_must_not_break_hash_tags() -> None:
    with pytest.raises(ValueError, match="hash tags"):
        RedisBroker.from_url("redis://localhost/0", namespace="a{b}")


async def test_unreachable_server_raises_connection_failed() -> None:
    broker = RedisBroker.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(ConnectionFailed, match="could not connect to Redis"):
        await broker.__aenter__()


async def test_unopened_broker_says_how_to_open_it() -> None:
    broker = RedisBroker.from_url("redis://127.0.0.1:6379/0")
    with pytest.raises(BrokerError, match="async with broker"):
        await broker.publish(env("jobs", "m1"))


async def test_keys_live_under_the_namespace_and_share_a_hash_tag_per_queue(
    make_broker: MakeBroker, raw: aioredis.Redis, namespace: str
) -> None:
    broker = await make_broker()
    await broker.publish_many([env("jobs", "a"), env("jobs", "b", priority=4),
                               env("jobs", "c", delay_s=60), env("mail", "d")])
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        await (await recv(consumer)).dead_letter("x")
    keys = sorted([k.decode() async for k in raw.scan_iter(match=f"{namespace}:*", count=1000)])
    assert keys == [f"{namespace}:{{jobs}}:dead", f"{namespace}:{{jobs}}:delayed",
                    f"{namespace}:{{jobs}}:p0", f"{namespace}:{{jobs}}:p4",
                    f"{namespace}:{{mail}}:p0"]


async def test_purge_namespace_leaves_other_namespaces_alone(
    make_broker: MakeBroker, raw: aioredis.Redis, namespace: str
) -> None:
    mine = await make_broker()
    async with RedisBroker.from_url(mine.url, namespace=namespace + "x") as neighbour:
        try:
            await neighbour.publish(env("jobs", "theirs"))
            await mine.publish(env("jobs", "mine"))
            assert await mine.purge_namespace() == 1
            assert (await neighbour.stats("jobs")).ready == 1
        finally:
            await neighbour.purge_namespace()


async def test_malformed_stream_entries_are_dead_lettered_not_delivered(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    stream = broker._queue("jobs").streams[0]
    await raw.xadd(stream, {"e": b"\xc1 not msgpack"})
    await raw.xadd(stream, {"something": "else"})
    await broker.publish(env("jobs", "good"))
    async with broker.consume(["jobs"], prefetch=5) as consumer:
        delivery = await recv(consumer)
        assert delivery.envelope.id == "good"
        await delivery.ack()
        await assert_nothing_arrives(consumer)
    dead = await broker.dead_letters("jobs")
    assert [d.reason for d in dead] == ["malformed_entry", "malformed_entry"]
    assert sorted(d.envelope.body for d in dead) == [b"", b"\xc1 not msgpack"]
    assert all(d.envelope.headers == {"taskloom-malformed": "true"} for d in dead)


async def test_priorities_beyond_the_range_are_clamped_not_refused(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    await broker.publish_many([env("jobs", "neg", priority=-5), env("jobs", "huge", priority=99),
                               env("jobs", "nine", priority=9)])
    async with broker.consume(["jobs"], prefetch=3) as consumer:
        got = [(await recv(consumer)).envelope for _ in range(3)]
    assert [e.id for e in got[:2]] in (["huge", "nine"], ["nine", "huge"])
    assert got[2].id == "neg"
    assert {e.id: e.priority for e in got} == {"neg": -5, "huge": 99, "nine": 9}


async def test_priority_across_queues_and_a_late_urgent_message(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.publish_many([env("a", "a-low"), env("b", "b-high", priority=7)])
    async with broker.consume(["a", "b"], prefetch=1) as consumer:
        first = await recv(consumer)
        assert first.envelope.id == "b-high"
        await broker.publish(env("a", "a-urgent", priority=9))
        await first.ack()
        assert (await recv(consumer)).envelope.id == "a-urgent"


async def test_delayed_priority_message_keeps_its_priority(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.publish_many([env("jobs", "urgent", priority=8, delay_s=0.2)])
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        delivery = await recv(consumer)
        assert (delivery.envelope.id, delivery.envelope.priority) == ("urgent", 8)
        await delivery.ack()
    assert (await broker.stats("jobs")).ready == 0


async def test_large_publish_many_is_chunked(make_broker: MakeBroker) -> None:
    broker = await make_broker(publish_chunk=7)
    envelopes = [Envelope(id=f"m{i}", queue="jobs" if i % 3 else "other", body=b"x",
                          priority=i % 2, delay_s=0.0) for i in range(50)]
    await broker.publish_many(envelopes)
    assert (await broker.stats("jobs")).ready + (await broker.stats("other")).ready == 50


async def test_busy_queues_are_served_in_turn(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.publish_many([env(q, f"{q}{i}") for i in range(4) for q in ("a", "b")])
    async with broker.consume(["a", "b"], prefetch=1) as consumer:
        queues = []
        for _ in range(4):
            delivery = await recv(consumer)
            queues.append(delivery.envelope.queue)
            await delivery.ack()
    assert sorted(queues) == ["a", "a", "b", "b"]


async def test_redis_errors_leave_as_broker_errors(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    q = broker._queue("jobs")
    await raw.set(q.streams[0], "not a stream")  # every command on it now fails: WRONGTYPE
    await raw.set(q.delayed, "not a sorted set")
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await broker.publish(env("jobs", "m1"))
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await broker.publish_many([env("jobs", "m1"), env("jobs", "m2", delay_s=1)])
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await broker.publish(env("jobs", "m3", delay_s=1))
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        await broker.stats("jobs")
    with pytest.raises(BrokerError, match="WRONGTYPE"):
        await broker.declare("jobs")
