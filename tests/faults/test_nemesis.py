"""The nemesis itself (tests/faults/nemesis.py): each mode does what the fault rows
rely on, checked with raw RESP bytes through the proxy to the shared Redis (keys
under the test's namespace; nothing destructive reaches the server).

- ``pass`` forwards both ways; ``reset`` RSTs open connections and new ones until
  the mode changes;
- ``blackhole`` *holds* bytes read before and during it (they arrive after the
  heal), ``drop`` *loses* them (the next command's reply is the first one seen);
- ``half_open`` lets client -> server through and holds server -> client;
- ``latency`` and ``throttle`` slow every chunk by at least their setting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import anyio
import pytest
import redis

from tests.conftest import REDIS_URL, server_missing
from tests.faults.harness import wait_until
from tests.faults.nemesis import TcpProxy

pytestmark = [pytest.mark.redis, pytest.mark.fault, pytest.mark.timeout(120)]

_URL = urlsplit(REDIS_URL)
HOST, PORT = _URL.hostname or "127.0.0.1", _URL.port or 6379
#: How long a test watches for bytes that must NOT arrive (held or lost). Only a
#: window can show an absence; the positive half of each test (the held bytes
#: arriving after the heal, or the next reply being the first) is the proof.
QUIET_S = 0.5
#: The keys the tests write through the proxy, each under the test's namespace;
#: ``direct`` deletes exactly these. Not a SCAN for ``<namespace>:*``: that walks
#: the whole shared keyspace (over a million keys left by other runs: minutes in
#: the fixture's teardown, past the test timeout).
KEYS = ("bh", "drop", "half", "big")


def resp(*args: str) -> bytes:
    out = f"*{len(args)}\r\n"
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out.encode()


@pytest.fixture
def direct(namespace: str) -> Iterator[redis.Redis]:
    client = redis.Redis(host=HOST, port=PORT, socket_timeout=10)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as e:
        server_missing("Redis", e)
    try:
        yield client
    finally:
        client.delete(*(f"{namespace}:{key}" for key in KEYS))
        client.close()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with TcpProxy(target_port=PORT, target_host=HOST) as p:
        yield p


@asynccontextmanager
async def connect(proxy: TcpProxy) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(OSError):  # an RST from the proxy
            await writer.wait_closed()


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    command: bytes) -> bytes:
    writer.write(command)
    await writer.drain()
    with anyio.fail_after(10):
        return await reader.readline()


async def nothing_arrives(reader: asyncio.StreamReader) -> None:
    with anyio.move_on_after(QUIET_S):
        data = await reader.read(100)
        raise AssertionError(f"bytes arrived while they should not: {data!r}")


async def test_pass_forwards_both_ways(proxy: TcpProxy) -> None:
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        assert await roundtrip(r, w, resp("ECHO", "hello")) == b"$5\r\n"
        assert await r.readline() == b"hello\r\n"
    assert proxy.connections_total == 1


async def test_reset_closes_open_and_new_connections_until_pass(proxy: TcpProxy) -> None:
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        proxy.set_mode("reset")
        with anyio.fail_after(10), suppress(ConnectionResetError):
            assert await r.read(100) == b""
    assert proxy.resets_total >= 1
    # a new connection is accepted, then reset at once (the RST may even beat
    # the end of the client's connect)
    with anyio.fail_after(10), suppress(ConnectionResetError):
        async with connect(proxy) as (r, w):
            assert await r.read(100) == b""
    assert proxy.resets_total >= 2
    proxy.set_mode("pass")
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"


async def test_blackhole_holds_bytes_and_delivers_them_after_the_heal(
    proxy: TcpProxy, direct: redis.Redis, namespace: str,
) -> None:
    key = f"{namespace}:bh"
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        proxy.set_mode("blackhole")
        w.write(resp("SET", key, "held"))
        await w.drain()
        await nothing_arrives(r)
        assert direct.get(key) is None  # not forwarded to the server either
        assert proxy.open_connections == 1  # the socket is kept
        proxy.set_mode("pass")
        with anyio.fail_after(10):
            assert await r.readline() == b"+OK\r\n"
    assert direct.get(key) == b"held"


async def test_drop_loses_bytes_and_keeps_the_socket(
    proxy: TcpProxy, direct: redis.Redis, namespace: str,
) -> None:
    key = f"{namespace}:drop"
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        proxy.set_mode("drop")
        lost = resp("SET", key, "lost")
        w.write(lost)
        await w.drain()

        async def read_by_proxy() -> bool:
            return proxy.dropped_bytes >= len(lost)

        await wait_until(read_by_proxy, timeout=10, what="the proxy to read and drop the SET")
        await nothing_arrives(r)
        assert proxy.open_connections == 1
        proxy.set_mode("pass")
        # the first reply after the heal is the ECHO's: the SET and its reply are gone
        assert await roundtrip(r, w, resp("ECHO", "after")) == b"$5\r\n"
        assert await r.readline() == b"after\r\n"
    assert direct.get(key) is None


async def test_half_open_forwards_up_and_holds_down(
    proxy: TcpProxy, direct: redis.Redis, namespace: str,
) -> None:
    key = f"{namespace}:half"
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        proxy.set_mode("half_open")
        w.write(resp("SET", key, "up"))
        await w.drain()

        async def stored() -> bool:
            return direct.get(key) == b"up"

        await wait_until(stored, timeout=10, what="the SET sent half-open to reach Redis")
        await nothing_arrives(r)  # its reply is held
        proxy.set_mode("pass")
        with anyio.fail_after(10):
            assert await r.readline() == b"+OK\r\n"


async def test_latency_delays_each_chunk(proxy: TcpProxy) -> None:
    async with connect(proxy) as (r, w):
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        proxy.set_mode("latency", delay_ms=300)
        t0 = time.monotonic()
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"
        # a lower bound (safe on a slow machine): 300 ms up and 300 ms down
        assert time.monotonic() - t0 >= 0.6
        proxy.set_mode("pass")
        assert await roundtrip(r, w, resp("PING")) == b"+PONG\r\n"


async def test_throttle_limits_bandwidth(proxy: TcpProxy, direct: redis.Redis,
                                         namespace: str) -> None:
    async with connect(proxy) as (r, w):
        proxy.set_mode("throttle", bytes_per_s=20_000)
        t0 = time.monotonic()
        assert await roundtrip(r, w, resp("SET", f"{namespace}:big", "x" * 10_000)) == b"+OK\r\n"
        # a lower bound: 10 kB up at 20 kB/s takes at least 0.5 s
        assert time.monotonic() - t0 >= 0.5


def test_unknown_mode_is_refused(proxy: TcpProxy) -> None:
    with pytest.raises(ValueError, match="unknown nemesis mode 'flaky'"):
        proxy.set_mode("flaky")  # type: ignore[arg-type]
