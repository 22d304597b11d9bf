"""A runtime on memory and one on the shared Redis (broker and results), per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from brokers.base import ConnectionFailed
from runtime import Runtime
from tests.conftest import REDIS_URL, server_missing


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def rt(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Runtime]:
    """A fresh runtime (not opened): memory broker + memory results, or Redis for both."""
    if request.param == "memory":
        yield Runtime()
        return
    runtime = Runtime(broker=REDIS_URL, namespace=namespace)
    try:
        async with runtime:
            pass
    except ConnectionFailed as e:
        server_missing("redis", e)
    yield runtime
    from runtime.results.redis import RedisResultStore

    async with runtime:
        await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
        if isinstance(runtime.results, RedisResultStore):
            await runtime.results.purge_namespace()
