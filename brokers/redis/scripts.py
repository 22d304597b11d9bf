"""The Lua scripts of the Redis broker and how they are run.

Each script is a file of ``lua/`` (its keys, arguments and reply are described at
its top); ``prelude.lua`` holds the helpers the scripts share and is prepended to
those that use them. The sources are read once, at import, through
:mod:`importlib.resources` (so they ship in the wheel), and loaded into Redis when
the broker connects. Calls go by ``EVALSHA``; a Redis that lost its script cache
(restarted, ``SCRIPT FLUSH``) answers ``NOSCRIPT`` and the script is loaded again.
Every script runs atomically; a batch of calls shares one round trip but is not
atomic as a whole.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rex

__all__ = ["ALL", "FETCH", "PENDING", "PROMOTE", "PUBLISH", "PURGE", "RECLAIM", "RELEASE",
           "SETTLE", "STATS", "Call", "Script", "cmd", "evalsha", "evalsha_many", "exchange",
           "pack_command"]

_LUA = resources.files("brokers.redis").joinpath("lua")


def _source(name: str) -> str:
    return _LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")


_PRELUDE: Final = _source("prelude")


class Script:
    """One Lua script: its source and the SHA1 that ``EVALSHA`` names it by."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, *, prelude: bool = True) -> None:
        self.name = name
        self.source = (_PRELUDE if prelude else "") + _source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:8]})"


FETCH: Final = Script("fetch")
SETTLE: Final = Script("settle")
PUBLISH: Final = Script("publish")
PROMOTE: Final = Script("promote")
RECLAIM: Final = Script("reclaim")
RELEASE: Final = Script("release")
PENDING: Final = Script("pending")
STATS: Final = Script("stats", prelude=False)
PURGE: Final = Script("purge", prelude=False)
#: Every script: loaded into Redis when the broker connects.
ALL: Final = (FETCH, SETTLE, PUBLISH, PROMOTE, RECLAIM, RELEASE, STATS, PURGE, PENDING)

#: One script call: the script, its keys, its arguments.
Call = tuple[Script, Sequence[str], Sequence[Any]]


async def cmd(client: aioredis.Redis, *args: Any) -> Any:
    """A raw command (no redis-py argument massaging; typed for mypy)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _arg(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    raise TypeError(f"a Redis command argument must be bytes, str, int or float, "
                    f"not {type(value).__name__}")


def pack_command(command: Sequence[Any]) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(command)]
    for value in command:
        arg = _arg(value)
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


def _pack(commands: Sequence[Sequence[Any]]) -> list[bytes]:
    """Commands in RESP, one chunk per command."""
    return [pack_command(command) for command in commands]


async def exchange(client: aioredis.Redis, commands: Sequence[bytes], count: int
                   ) -> list[Any]:
    """Send ``commands`` (packed RESP) in one write on one pooled connection and
    read ``count`` replies; error replies come back in place as exceptions,
    connection failures raise.

    One timeout, the connection's ``socket_timeout``, bounds the whole exchange
    (``redis.exceptions.TimeoutError`` past it). redis-py under a socket timeout
    starts an asyncio task for every write (``asyncio.wait_for`` on Python 3.11:
    the write goes out one turn of the event loop later) and arms a timer for
    every reply; on the worker's hot path that cost more than the exchange. Any
    failure mid-exchange (a timeout included) closes the connection (redis-py
    does so for any exception while writing or reading), so a half-read
    connection never goes back into use."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    limit = conn.socket_timeout
    conn.socket_timeout = None  # this exchange's own timeout below covers it
    try:
        try:
            async with asyncio.timeout(limit):
                await conn.send_packed_command(commands, check_health=False)
                replies: list[Any] = []
                for _ in range(count):
                    try:
                        replies.append(await conn.read_response())
                    except rex.ResponseError as e:  # read in full: the next reply follows
                        replies.append(e)
        except TimeoutError as e:
            raise rex.TimeoutError(f"no reply from Redis within the socket timeout of "
                                   f"{limit}s") from e
    finally:
        conn.socket_timeout = limit
        await pool.release(conn)
    return replies


async def evalsha(client: aioredis.Redis, script: Script, keys: Sequence[str],
                  args: Sequence[Any]) -> Any:
    """Run ``script``, loading it first when Redis does not know it (``NOSCRIPT``);
    an error reply raises."""
    result = (await evalsha_many(client, [(script, keys, args)]))[0]
    if isinstance(result, Exception):
        raise result
    return result


async def evalsha_many(client: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Run script calls in one round trip; each runs atomically, the batch does
    not. Error replies come back in place as exceptions; connection errors raise.

    Packed and sent on one pooled connection (:func:`exchange`), replies read in
    order: redis-py's pipeline machinery per call costs more than the scripts
    themselves on the consumer's hot path (fetch + settle). No retry is lost: the
    broker's client retries nothing by itself (see ``RedisBroker.from_url``)."""
    packed = _pack([("EVALSHA", script.sha, len(keys), *keys, *args)
                    for script, keys, args in calls])
    results = await exchange(client, packed, len(calls))
    for i, result in enumerate(results):
        if isinstance(result, rex.NoScriptError):
            script, keys, args = calls[i]
            try:
                await cmd(client, "SCRIPT", "LOAD", script.source)
                results[i] = (await exchange(client, _pack([
                    ("EVALSHA", script.sha, len(keys), *keys, *args)]), 1))[0]
            except rex.ResponseError as e:
                results[i] = e
    return results
