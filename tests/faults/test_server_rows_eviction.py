"""RELIABILITY.md row C7, eviction, against a redis-server each test starts itself.

- A Redis that may evict keys (``maxmemory-policy allkeys-lru``) could drop
  queued messages, delayed sets or pending lists without a trace: the runtime
  logs an error naming the policy and the fix when it connects (it does not
  refuse to start: a managed Redis may not let you change the policy, and the
  error says what is at stake).
- Under ``noeviction`` a full Redis refuses writes: ``enqueue`` and
  ``enqueue_many`` raise ``PublishError`` (a ``BrokerError``) saying Redis
  reached maxmemory and what to do, and every message confirmed before is
  still queued (nothing was evicted to make room).
"""

from __future__ import annotations

import pytest
import redis
from structlog.testing import capture_logs

from brokers.base import BrokerError, PublishError
from runtime.app import Runtime
from tests.faults.harness import RedisServer

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(60)]

QUEUE = "default"
#: Bytes of each task's argument: a backlog that fills a few MiB quickly.
PAYLOAD = "x" * 8_000


def configure(server: RedisServer, **settings: str) -> None:
    client = redis.Redis(port=server.port)
    try:
        for key, value in settings.items():
            client.config_set(key.replace("_", "-"), value)
    finally:
        client.close()


def build(server: RedisServer, namespace: str) -> Runtime:
    rt = Runtime(broker=server.url, namespace=namespace)

    @rt.task(name="c7.store")
    async def store(blob: str) -> int:
        return len(blob)

    return rt


def eviction_errors(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if "maxmemory-policy" in str(e["event"])]


async def test_a_redis_that_may_evict_is_reported_as_an_error_at_start(
    redis_server: RedisServer, namespace: str
) -> None:
    configure(redis_server, maxmemory="64mb", maxmemory_policy="allkeys-lru")
    rt = build(redis_server, namespace)
    with capture_logs() as logs:
        async with rt:
            pass
    [line] = eviction_errors(logs)
    assert line["log_level"] == "error"
    assert line["policy"] == "allkeys-lru"
    assert "set maxmemory-policy noeviction" in str(line["event"])


async def test_a_redis_under_noeviction_is_not_reported(
    redis_server: RedisServer, namespace: str
) -> None:
    configure(redis_server, maxmemory="64mb", maxmemory_policy="noeviction")
    with capture_logs() as logs:
        async with build(redis_server, namespace):
            pass
    assert not eviction_errors(logs), logs


async def test_a_full_redis_under_noeviction_makes_enqueue_raise_a_clear_error(
    redis_server: RedisServer, namespace: str
) -> None:
    """The backlog grows until Redis refuses: the refusal is a PublishError with
    what to do, for one message and for a batch, and nothing confirmed is gone."""
    client = redis.Redis(port=redis_server.port)
    used = int(client.info("memory")["used_memory"])
    client.close()
    # room for a few hundred of these messages above what an empty server uses
    configure(redis_server, maxmemory=str(used + 4 * 1024 * 1024),
              maxmemory_policy="noeviction")
    rt = build(redis_server, namespace)
    store = rt.registry.get("c7.store")
    confirmed = 0
    async with rt:
        with pytest.raises(PublishError) as refused:
            for _ in range(10_000):  # bounded: 10,000 x 8 kB is far above the 4 MiB room
                await rt.enqueue(store.s(PAYLOAD))
                confirmed += 1
        with pytest.raises(BrokerError) as batch_refused:
            await rt.enqueue_many([store.s(PAYLOAD) for _ in range(10)])
        stats = await rt.broker.stats(QUEUE)
    assert confirmed > 0
    for error in (refused.value, batch_refused.value):
        text = str(error)
        assert "used memory > 'maxmemory'" in text, text
        assert "Redis reached maxmemory: raise it, drain the queues, or purge dead letters" in text
    assert isinstance(batch_refused.value, PublishError)
    assert stats.ready == confirmed, (stats, confirmed)
