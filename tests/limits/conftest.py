"""Limiter stores for the tests: memory, and Redis under a unique namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from runtime.ops.limits import LimitStore, MemoryLimitStore, RedisLimitStore
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[LimitStore]:
    if request.param == "memory":
        yield MemoryLimitStore(clock=lambda: 0.0)
        return
    s = RedisLimitStore(REDIS_URL, namespace=namespace)
    try:
        yield s
    finally:
        await s.purge()
        await s.aclose()
