"""The ``store`` fixture: one result-store contract suite over memory and Redis.

Every test gets a fresh store in a unique namespace (cleaned up with
``purge_namespace()`` on Redis). ``open_store`` opens another store of the same
kind and namespace inside a test (e.g. with a short TTL); ``peer`` is a second
store of the same app, as another process would see it (on the memory store,
which lives in one process, the peer is the store itself).

The store is entered and exited in one task (``_hosted``): pytest-asyncio runs
fixture setup and teardown in different tasks, and a store's task group must
be exited by the task that entered it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ConnectionFailed
from runtime.results import MemoryResultStore
from runtime.results.redis import RedisResultStore
from tests.conftest import REDIS_URL, server_missing

STORES = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
]

OpenStore = Callable[..., AbstractAsyncContextManager[Any]]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "result_promise(*numbers): the numbered promises of runtime/results/base.py "
        "this result-store contract test proves (tests/test_meta_promises.py)")


@asynccontextmanager
async def _hosted(store: Any) -> AsyncIterator[Any]:
    """``async with store`` run by one helper task, awaited on the way out."""
    entered = asyncio.Event()
    leave = asyncio.Event()
    failure: list[BaseException] = []

    async def host() -> None:
        try:
            async with store:
                entered.set()
                await leave.wait()
        except BaseException as e:
            failure.append(e)
            entered.set()

    task = asyncio.create_task(host())
    try:
        await entered.wait()
        if failure:
            raise failure[0]
        yield store
    finally:
        leave.set()
        await task
    if failure:
        raise failure[0]


def _make(kind: str, namespace: str, **options: Any) -> Any:
    if kind == "memory":
        return MemoryResultStore(**options)
    return RedisResultStore(REDIS_URL, namespace=namespace, **options)


@pytest.fixture(params=STORES)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def open_store(kind: str, namespace: str) -> OpenStore:
    """Open another store of this test's kind and namespace (``async with``)."""

    @asynccontextmanager
    async def open_(**options: Any) -> AsyncIterator[Any]:
        store = _make(kind, namespace, **options)
        try:
            await store.__aenter__()
        except ConnectionFailed as e:
            server_missing(kind, e)
        try:
            yield store
        finally:
            await store.__aexit__(None, None, None)

    return open_


@pytest.fixture
async def store(kind: str, namespace: str) -> AsyncIterator[Any]:
    s = _make(kind, namespace)
    try:
        async with _hosted(s):
            try:
                yield s
            finally:
                if kind == "redis":
                    await s.purge_namespace()
    except ConnectionFailed as e:
        server_missing(kind, e)


@pytest.fixture
async def peer(kind: str, store: Any, namespace: str) -> AsyncIterator[Any]:
    """Another store of the same app (the store itself on memory)."""
    if kind == "memory":
        yield store
        return
    async with _hosted(_make(kind, namespace)) as other:
        yield other


# -- a redis-server of our own, for fault tests -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OwnRedis:
    """A redis-server started by the test on a free port in a temp dir; killed by pid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.root), "--save", "", "--appendonly", "no",
                 "--logfile", str(self.root / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except FileNotFoundError as e:
            server_missing("redis-server binary", e)
        deadline = time.monotonic() + 10
        while True:  # bounded wait for a starting server to accept connections
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
