"""Fixtures of the fault suite: servers the tests own, the ledger, worker pools.

The servers here are started by the tests themselves (redis-server per test,
one RabbitMQ node per module). When one cannot start, the fixture raises a
HarnessError that says why: the fault suite never skips silently.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import RabbitNode, RedisServer
from tests.faults.ledger import Ledger


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test: AOF everysec, no RDB, its own port and dir."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One isolated RabbitMQ node per test module (startup takes ~5-10 s)."""
    root = tmp_path_factory.mktemp("rabbit")
    node = RabbitNode(root)
    node.start()
    try:
        yield node
    finally:
        node.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger")
