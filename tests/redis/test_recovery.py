"""Data loss on the server (restart without persistence, deleted keys): loud, then serving."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from tests.contract.helpers import env, recv
from tests.redis.conftest import MakeBroker

pytestmark = pytest.mark.redis


async def delete_queue_keys(raw: aioredis.Redis, namespace: str) -> int:
    keys = [k async for k in raw.scan_iter(match=f"{namespace}:*", count=1000)]
    return int(await raw.delete(*keys)) if keys else 0


async def test_lost_group_is_recreated_loudly_and_serving_goes_on(
    make_broker: MakeBroker, raw: aioredis.Redis, namespace: str
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "before"))
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=2) as consumer:
            await (await recv(consumer)).ack()
            await anyio.wait_all_tasks_blocked()  # the consumer waits on XREAD BLOCK
            assert await delete_queue_keys(raw, namespace) > 0  # "Redis restarted empty"
            await broker.publish(env("jobs", "after"))
            delivery = await recv(consumer)
            assert (delivery.envelope.id, delivery.delivery_count) == ("after", 1)
            await delivery.ack()
            await broker.publish(env("jobs", "later"))
            await (await recv(consumer)).ack()
    alerts = [e for e in logs if e["event"].startswith("DATA LOSS")]
    assert len(alerts) == 1, "one alert per loss, no NOGROUP loop"
    assert alerts[0]["log_level"] == "error"
    assert alerts[0]["queue"] == "jobs"
    stats = await broker.stats("jobs")
    assert (stats.ready, stats.in_flight) == (0, 0)


async def test_loss_while_holding_a_delivery(
    make_broker: MakeBroker, raw: aioredis.Redis, namespace: str
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "held"))
    with capture_logs() as logs:
        async with broker.consume(["jobs"], prefetch=1) as consumer:
            held = await recv(consumer)
            await delete_queue_keys(raw, namespace)
            await held.ack()  # the group is gone: logged, not raised
            await broker.publish(env("jobs", "next"))
            delivery = await recv(consumer)
            assert delivery.envelope.id == "next"
            await delivery.ack()
    assert any(e["log_level"] == "error" and "DATA LOSS" in e["event"] for e in logs)


async def test_publish_after_loss_recreates_the_stream(
    make_broker: MakeBroker, raw: aioredis.Redis, namespace: str
) -> None:
    broker = await make_broker()
    await broker.declare("jobs")
    await delete_queue_keys(raw, namespace)
    await broker.publish(env("jobs", "m1"))
    assert (await broker.stats("jobs")).ready == 1
    async with broker.consume(["jobs"], prefetch=1) as consumer:
        assert (await recv(consumer)).envelope.id == "m1"


async def test_scripts_flushed_from_the_server_are_reloaded(
    make_broker: MakeBroker, raw: aioredis.Redis
) -> None:
    broker = await make_broker()
    await broker.publish(env("jobs", "m1", delay_s=0.01))
    # SCRIPT FLUSH is server-wide but harmless to other clients: they reload on NOSCRIPT
    await raw.script_flush()
    await broker.publish_many([env("jobs", "m2", priority=3), env("jobs", "m3", delay_s=0.01)])
    async with broker.consume(["jobs"], prefetch=3) as consumer:
        got = {(await recv(consumer)).envelope.id for _ in range(3)}
    assert got == {"m1", "m2", "m3"}
