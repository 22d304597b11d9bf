"""The Redis result store's revocation watch: every revocation of the app
reaches ``is_revoked`` of each watching store (promise 6).

Subscribes to ``{ns}:revoke``, then loads the recent revocations from the
``{ns}:revoked`` zset (so none published in between is missed), then hears
each new one; reconnects with backoff when the connection drops.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import anyio
import anyio.abc
import redis.asyncio as aioredis
import structlog

from runtime.errors import ResultStoreUnavailable
from runtime.results.notify import connect
from runtime.results.redis_wire import execute, mapped, pairs

__all__ = ["watch_revocations"]

log = structlog.get_logger("runtime.results.redis")

#: Longest pause (before jitter) of the revocation watch between reconnections.
_WAIT_RETRY_MAX_S = 2.0


async def watch_revocations(client: aioredis.Redis, where: str, channel: bytes, key: str,
                            note: Callable[[str, float], None], ttl_s: Callable[[], float], *,
                            task_status: anyio.abc.TaskStatus[None]) -> None:
    """Call ``note(task_id, seconds_left)`` for each revocation until cancelled;
    ``ResultStoreUnavailable`` if the first connection fails."""
    started = False
    backoff = 0.1
    down_since: float | None = None
    while True:
        pool = client.connection_pool
        conn = pool.connection_class(
            **{**pool.connection_kwargs, "protocol": 2, "socket_timeout": None})
        try:
            with mapped(where, "watch revocations"):
                await connect(conn)
                await conn.send_command("SUBSCRIBE", channel, check_health=False)
                while True:  # the confirmation
                    reply = await conn.read_response(timeout=math.inf)
                    if isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                        break
                now_ms = int(time.time() * 1000)
                recent = await execute(client, "ZRANGE", key, now_ms, "+inf", "BYSCORE",
                                       "WITHSCORES")
            for task_id, expires_ms in pairs(recent):
                note(task_id, (expires_ms - now_ms) / 1000)
            if not started:
                started = True
                task_status.started()
            if down_since is not None:
                log.warning("revocation watch reconnected", where=where,
                            down_s=round(time.monotonic() - down_since, 2))
                down_since = None
            backoff = 0.1
            with mapped(where, "watch revocations"):
                while True:
                    reply = await conn.read_response(timeout=math.inf)
                    if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                        note(reply[2].decode(), ttl_s())
        except ResultStoreUnavailable as e:
            if not started:
                raise
            if down_since is None:  # one line per outage, not one per attempt
                down_since = time.monotonic()
                log.warning("revocation watch lost its connection; reconnecting with "
                            "backoff", where=where, error=str(e))
        finally:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
        await anyio.sleep(backoff * random.uniform(0.5, 1.0))
        backoff = min(backoff * 2, _WAIT_RETRY_MAX_S)
