"""The broker fixture: one contract suite, parametrised over every broker.

A broker joins the suite by appearing in ``URLS``/``BROKERS`` (the AMQP broker
joins automatically once ``brokers/amqp.py`` exists). Every test gets a fresh
broker in a unique namespace, cleaned up with ``purge_namespace()`` where the
broker has it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from typing import Any

import pytest

import brokers
from tests.conftest import AMQP_URL, REDIS_URL, server_missing

URLS = {"memory": "memory://", "redis": REDIS_URL, "amqp": AMQP_URL}

BROKERS = [pytest.param("memory", id="memory")]
if importlib.util.find_spec("brokers.redis") is not None:
    BROKERS.append(pytest.param("redis", id="redis", marks=pytest.mark.redis))
if importlib.util.find_spec("brokers.amqp") is not None:
    BROKERS.append(pytest.param("amqp", id="amqp", marks=pytest.mark.amqp))


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Any]:
    kind: str = request.param
    b = brokers.from_url(URLS[kind], namespace=namespace)
    try:
        await b.__aenter__()
    except brokers.ConnectionFailed as e:
        server_missing(kind, e)
    try:
        yield b
    finally:
        try:
            cleanup = getattr(b, "purge_namespace", None)
            if cleanup is not None:
                await cleanup()
        finally:
            await b.__aexit__(None, None, None)


@pytest.fixture
def broker_kind(request: pytest.FixtureRequest) -> str:
    """The kind of broker ("memory", "redis", "amqp") of the test's ``broker`` param."""
    return str(request.node.callspec.params["broker"])


@pytest.fixture
def queue() -> str:
    """The queue a test uses (brokers are namespaced per test)."""
    return "jobs"
