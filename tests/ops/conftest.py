"""Fixtures of the operations tests: the index and the event stream on memory and on
the shared Redis (a unique namespace per test, its keys removed after)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import ops_prefix
from runtime.ops.events import MemoryEventStream, RedisEventStream
from runtime.ops.index import IndexSettings, MemoryIndex, RedisIndex
from tests.conftest import REDIS_URL, server_missing

KINDS = [pytest.param("memory", id="memory"),
         pytest.param("redis", id="redis", marks=pytest.mark.redis)]


async def purge_ops(namespace: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=ops_prefix(namespace) + "*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.unlink(*keys[i:i + 500])
    finally:
        await client.aclose()


async def redis_up() -> None:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as e:
        server_missing("Redis", e)
    finally:
        await client.aclose()


@pytest.fixture(params=KINDS)
async def kind(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[str]:
    if request.param == "redis":
        await redis_up()
    yield str(request.param)
    if request.param == "redis":
        await purge_ops(namespace)


def new_index(kind: str, namespace: str, settings: IndexSettings | None = None
              ) -> MemoryIndex | RedisIndex:
    if kind == "memory":
        return MemoryIndex(settings)
    return RedisIndex(REDIS_URL, namespace=namespace, settings=settings)


def new_events(kind: str, namespace: str, max_len: int = 10_000
               ) -> MemoryEventStream | RedisEventStream:
    if kind == "memory":
        return MemoryEventStream(max_len=max_len)
    return RedisEventStream(REDIS_URL, namespace=namespace, max_len=max_len)


_clock = itertools.count(int(time.time() * 1000))


def tr(task_id: str, phase: Phase, *, at_ms: int | None = None, queue: str = "q",
       task: str = "t.add", attempt: int = 1, **kw: object) -> Transition:
    return Transition(id=task_id, task=task, queue=queue, phase=phase,
                      at_ms=at_ms if at_ms is not None else next(_clock), attempt=attempt,
                      **kw)  # type: ignore[arg-type]
