"""Fixtures for the Redis-specific tests: brokers with test-sized options, a raw client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from brokers.base import ConnectionFailed
from brokers.redis import RedisBroker
from tests.conftest import REDIS_URL, server_missing

pytestmark = pytest.mark.redis

MakeBroker = Callable[..., Awaitable[RedisBroker]]


def url_with(**options: Any) -> str:
    if not options:
        return REDIS_URL
    sep = "&" if "?" in REDIS_URL else "?"
    return REDIS_URL + sep + "&".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture
async def make_broker(namespace: str) -> AsyncIterator[MakeBroker]:
    """Open brokers on the test namespace with options given as keywords;
    everything is closed and the namespace purged afterwards."""
    opened: list[RedisBroker] = []

    async def make(**options: Any) -> RedisBroker:
        broker = RedisBroker.from_url(url_with(**options), namespace=namespace)
        try:
            await broker.__aenter__()
        except ConnectionFailed as e:
            server_missing("redis", e)
        opened.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in reversed(opened):
            await broker.__aexit__(None, None, None)
        if opened:
            await opened[0].__aenter__()
            await opened[0].purge_namespace()
            await opened[0].__aexit__(None, None, None)


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as e:
        server_missing("redis", e)
    try:
        yield client
    finally:
        await client.aclose()
