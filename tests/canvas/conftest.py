"""The ``rt`` fixture: one canvas suite over memory, Redis and RabbitMQ.

- ``memory``: the memory broker and the memory result store;
- ``redis``: ``Runtime(broker=REDIS_URL, namespace=ns)`` (results in the same Redis);
- ``amqp``: ``Runtime(broker=AMQP_URL, results=REDIS_URL, namespace=ns)``.

The fixture hands out a runtime that is *not* connected: each test opens it
itself, with its embedded worker, in the test's own task
(``async with rt, rt.worker(): ...``). pytest-asyncio runs a fixture's setup and
teardown in different tasks, and a task group (the result store's, the
worker's) must be left by the task that entered it. Setup only checks that the
servers answer (connect and disconnect at once); teardown connects again and
deletes the namespace (``purge_namespace()`` of the broker and of the store,
where they have one), both inside one task each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
import pytest

from brokers.amqp import DELAY_LEVELS
from runtime import Runtime
from runtime.errors import ConnectionFailed
from tests.conftest import AMQP_URL, REDIS_URL, server_missing

BROKERS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("amqp", id="amqp", marks=[pytest.mark.amqp, pytest.mark.redis]),
]

SERVERS = {"memory": "memory", "redis": "Redis", "amqp": "RabbitMQ (and Redis for results)"}


def make_runtime(kind: str, namespace: str, **options: Any) -> Runtime:
    """A runtime of ``kind`` in ``namespace`` (not connected)."""
    if kind == "memory":
        return Runtime(**options)
    if kind == "redis":
        return Runtime(broker=REDIS_URL, namespace=namespace, **options)
    if kind == "amqp":
        return Runtime(broker=AMQP_URL, results=REDIS_URL, namespace=namespace, **options)
    raise ValueError(f"unknown broker kind {kind!r}")


async def purge(rt: Runtime) -> None:
    """Delete what ``rt`` left on the servers: connects, purges, disconnects
    (in the caller's task). The AMQP broker remembers the queues it declared
    across connections, so the same runtime object must be purged."""
    async with rt:
        for part in (rt.broker, rt.results):
            purge_namespace = getattr(part, "purge_namespace", None)
            if purge_namespace is not None:
                await purge_namespace()


async def purge_amqp_delays(namespace: str, queues: Sequence[str] = ("default",)) -> None:
    """Delete the delay levels of ``queues`` (and the delay exchanges) in ``namespace``
    on the test RabbitMQ. For tests whose worker *processes* delayed messages: the
    levels they declared are unknown to the test's own broker, whose
    ``purge_namespace()`` deletes only what it declared itself. RabbitMQ deletes a
    missing queue or exchange without complaint."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            for k in range(DELAY_LEVELS):
                await channel.queue_delete(f"{namespace}.{queue}.delay.{k:02d}")
        for k in range(DELAY_LEVELS):
            await channel.exchange_delete(f"{namespace}.taskloom.delay.{k:02d}")
        await channel.exchange_delete(f"{namespace}.taskloom.delay")


@pytest.fixture(params=BROKERS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
async def rt(kind: str, namespace: str) -> AsyncIterator[Runtime]:
    """A fresh, unconnected runtime on ``kind``; its namespace is purged afterwards."""
    runtime = make_runtime(kind, namespace)
    try:
        async with runtime:
            pass
    except ConnectionFailed as e:
        server_missing(SERVERS[kind], e)
    try:
        yield runtime
    finally:
        await purge(runtime)
