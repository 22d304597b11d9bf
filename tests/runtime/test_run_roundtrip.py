"""``run()`` in two round trips (issue 18): the result store listens before
the task is published, so a store that cannot listen stops the call before
anything is sent, and a refused publish is the caller's error as is.

Errors are caught the way a user does: outside every context manager the
library provides."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from brokers.base import Envelope, PublishError
from brokers.memory import MemoryBroker
from runtime import Runtime
from runtime.errors import ResultStoreUnavailable
from runtime.results.redis import RedisResultStore
from tests.results_contract.conftest import OwnRedis
from tests.runtime.helpers import LIMIT


class CountingBroker(MemoryBroker):
    """The memory broker, counting publishes; refuses them while ``refuse``."""

    published = 0
    refuse = False

    async def publish(self, envelope: Envelope) -> None:
        self.published += 1
        if self.refuse:
            raise PublishError(f"test: publish of {envelope.id} refused")
        await super().publish(envelope)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        self.published += len(envelopes)
        await super().publish_many(envelopes)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.redis
async def test_run_with_its_result_store_down_sends_nothing(own_redis: OwnRedis) -> None:
    broker = CountingBroker()
    rt = Runtime(broker=broker, results=RedisResultStore(own_redis.url))

    @rt.task(name="run_roundtrip.noop")
    async def noop() -> None:
        return None

    with anyio.fail_after(LIMIT):
        try:
            async with rt:
                own_redis.kill()
                await rt.run(noop.s(), timeout=30)
        except ResultStoreUnavailable as e:
            assert "can be retried" in str(e)
        else:
            raise AssertionError("run() with the result store down did not raise")

    assert broker.published == 0  # the caller can retry without a duplicate task


@pytest.mark.redis
async def test_run_whose_publish_is_refused_raises_the_publish_error(
        own_redis: OwnRedis) -> None:
    broker = CountingBroker()
    rt = Runtime(broker=broker, results=RedisResultStore(own_redis.url))

    @rt.task(name="run_roundtrip.add")
    async def add(x: int, y: int) -> int:
        return x + y

    with anyio.fail_after(LIMIT):
        try:
            async with rt:
                broker.refuse = True
                await rt.run(add.s(1, 2), timeout=30)
        except PublishError as e:
            assert "refused" in str(e)
        else:
            raise AssertionError("run() with a refused publish did not raise")
        broker.refuse = False
        async with rt, rt.worker():  # the listener is fine afterwards
            assert await rt.run(add.s(1, 2), timeout=30) == 3
