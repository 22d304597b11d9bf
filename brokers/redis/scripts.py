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

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
import redis.exceptions as rex

__all__ = ["ALL", "FETCH", "PENDING", "PROMOTE", "PUBLISH", "PURGE", "RECLAIM", "RELEASE",
           "SETTLE", "STATS", "Call", "Script", "cmd", "evalsha", "evalsha_many"]

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


async def evalsha(client: aioredis.Redis, script: Script, keys: Sequence[str],
                  args: Sequence[Any]) -> Any:
    """Run ``script``, loading it first when Redis does not know it (``NOSCRIPT``)."""
    try:
        return await cmd(client, "EVALSHA", script.sha, len(keys), *keys, *args)
    except rex.NoScriptError:
        await cmd(client, "SCRIPT", "LOAD", script.source)
        return await cmd(client, "EVALSHA", script.sha, len(keys), *keys, *args)


async def evalsha_many(client: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Run script calls in one round trip; each runs atomically, the batch does
    not. Error replies come back in place as exceptions; connection errors raise.

    Packed and sent on one pooled connection, replies read in order: redis-py's
    pipeline machinery per call costs more than the scripts themselves on the
    consumer's hot path (fetch + settle). No retry is lost: the broker's client
    retries nothing by itself (see ``RedisBroker.from_url``)."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        packed = conn.pack_commands(
            [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls])
        await conn.send_packed_command(packed, check_health=False)
        results: list[Any] = []
        for _ in calls:
            try:
                results.append(await conn.read_response())
            except rex.ResponseError as e:  # read in full: the next reply follows
                results.append(e)
    finally:
        await pool.release(conn)
    for i, result in enumerate(results):
        if isinstance(result, rex.NoScriptError):
            script, keys, args = calls[i]
            try:
                results[i] = await evalsha(client, script, keys, args)
            except rex.ResponseError as e:
                results[i] = e
    return results
