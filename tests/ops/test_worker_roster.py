"""Listing live workers reads a roster (``<ns>:taskloom:workers``), not a scan of
the database: a Redis holding millions of other keys answers at once, and a
heartbeat hash that no roster names (written by a worker from before the
roster) is only found while no roster exists."""

from __future__ import annotations

import redis.asyncio as aioredis

from runtime.ops.workers import RedisHeartbeats, roster_key
from runtime.process.liveness import Heartbeat, RedisLivenessStore
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up


def _beat(worker_id: str) -> Heartbeat:
    return Heartbeat(id=worker_id, host="h", pid=1, queues=["q"], concurrency=2)


async def _legacy_hash(r: aioredis.Redis, prefix: str, worker_id: str) -> None:
    await r.hset(prefix + worker_id, mapping={"id": worker_id, "host": "old", "pid": "2",
                                              "queues": "q"})
    await r.pexpire(prefix + worker_id, 60_000)


async def test_the_roster_names_the_live_workers(namespace: str) -> None:
    await redis_up()
    store = RedisLivenessStore(REDIS_URL, namespace=namespace)
    reader = RedisHeartbeats(REDIS_URL, namespace=namespace)
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        await _legacy_hash(r, store.prefix, "old-w")   # before any roster: found by a scan
        assert [w.id for w in await reader.list()] == ["old-w"]
        await store.put(_beat("w1"), ttl_s=60)
        await store.put(_beat("w2"), ttl_s=60)
        assert await r.exists(roster_key(store.prefix))
        # from now on only the roster is read: the pre-roster hash is not listed
        assert [w.id for w in await reader.list()] == ["w1", "w2"]
        assert [b.id for b in await store.list()] == ["w1", "w2"]
        await store.remove("w1")
        assert [w.id for w in await reader.list()] == ["w2"]
        await store.put(_beat("w3"), ttl_s=60)
        await r.delete(store.prefix + "w3")              # its hash expired before its score
        assert [w.id for w in await reader.list()] == ["w2"]
    finally:
        await store.aclose()
        await reader.aclose()
        await r.delete(roster_key(store.prefix))
        await r.aclose()
        await purge_ops(namespace)
