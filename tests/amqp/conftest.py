"""Fixtures of the AMQP broker tests: brokers on the test server, raw aio-pika access,
and a TCP proxy the test owns (to cut connections without touching the server)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import anyio
import anyio.abc
import pytest

from brokers.amqp import AmqpBroker, AmqpBrokerOptions
from brokers.base import ConnectionFailed
from tests.conftest import AMQP_URL, require_tool, server_missing

pytestmark = pytest.mark.amqp


def amqp_url(base: str = AMQP_URL, *, netloc: str | None = None, path: str | None = None,
             **options: Any) -> str:
    """The test server's URL with these broker options (and optionally another
    host:port or vhost path); broker options of the base URL are dropped, so that
    each test states the options it depends on."""
    parts = urlsplit(base)
    known = set(AmqpBrokerOptions.__struct_fields__)
    query = {k: v for k, v in parse_qsl(parts.query) if k not in known}
    query.update({k: str(v).lower() if isinstance(v, bool) else str(v)
                  for k, v in options.items()})
    return urlunsplit(parts._replace(netloc=netloc or parts.netloc,
                                     path=parts.path if path is None else path,
                                     query=urlencode(query)))


MakeBroker = Callable[..., Awaitable[AmqpBroker]]


@pytest.fixture
async def make_broker(namespace: str) -> AsyncIterator[MakeBroker]:
    """``await make_broker(**options)``: a connected broker in the test's namespace,
    purged and closed at the end."""
    async with AsyncExitStack() as stack:

        async def make(url: str | None = None, **options: Any) -> AmqpBroker:
            broker = AmqpBroker.from_url(url or amqp_url(**options), namespace=namespace)
            try:
                await broker.__aenter__()
            except ConnectionFailed as e:
                server_missing("RabbitMQ", e)
            stack.push_async_exit(broker)
            stack.push_async_callback(broker.purge_namespace)
            return broker

        yield make


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel on the test server, to act behind the broker's back."""
    try:
        connection = await aio_pika.connect(amqp_url())
    except Exception as e:
        server_missing("RabbitMQ", e)
    async with connection:
        yield await connection.channel()


class Proxy:
    """A TCP proxy between the broker and RabbitMQ; ``reset()`` cuts every connection
    through it (both sides closed, as a dropped link or a crashed peer would)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.connections = 0
        self._streams: set[anyio.abc.ByteStream] = set()
        self._opened = anyio.Event()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.upstream) as server:
            self._streams |= {client, server}
            self.connections += 1
            self._opened.set()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server)
                tg.start_soon(self._pump, server, client)
            self._streams -= {client, server}

    @staticmethod
    async def _pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError, OSError):
            async for chunk in source:
                await sink.send(chunk)
        with contextlib.suppress(Exception):
            await sink.aclose()

    async def reset(self) -> None:
        for stream in list(self._streams):
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def wait_for_connections(self, count: int) -> None:
        while self.connections < count:
            self._opened = anyio.Event()
            await self._opened.wait()


@asynccontextmanager
async def running_proxy() -> AsyncIterator[Proxy]:
    """A :class:`Proxy` to the test server, served by the calling task (a context
    manager rather than a fixture, so that its task group lives in the test's task)."""
    parts = urlsplit(AMQP_URL)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()


class RabbitmqctlFailed(AssertionError):
    """rabbitmqctl exited non-zero: the test cannot observe or act on the server."""


async def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl on the local node and return its output. A missing rabbitmqctl
    fails in CI (skips elsewhere, see :func:`tests.conftest.require_tool`); a failed
    call always fails the test: it is never a reason to skip."""
    exe = require_tool("rabbitmqctl", "apt-get install -y rabbitmq-server")
    done = await anyio.run_process([exe, "-q", *args], check=False)
    if done.returncode != 0:
        raise RabbitmqctlFailed(
            f"rabbitmqctl {' '.join(args)} exited {done.returncode}: "
            f"{done.stderr.decode().strip()}; check that the local RabbitMQ node runs and "
            f"that this user may run rabbitmqctl (the Erlang cookie)")
    return done.stdout.decode()
