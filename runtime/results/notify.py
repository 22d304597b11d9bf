"""Waking the waiters of the Redis result store.

One shared pub/sub connection per store, run in the store's task group,
holds the channels of the ids being waited on and wakes their waiters. A
waiter reads first, subscribes only when there is no terminal result yet,
then reads again once the subscription is confirmed (so a result stored in
between is never missed); ``wait_sent`` (``run``, a fresh id) subscribes and
waits for the confirmation before the task is sent, and reads nothing.
Subscriptions are one-shot; their UNSUBSCRIBEs ride with the next SUBSCRIBE
in one write (at most ``_LAZY_UNSUBSCRIBES`` wait). When the connection
breaks, every waiter raises ``ResultStoreUnavailable`` at once; the next
``wait`` reconnects.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager

import anyio
import anyio.abc
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog
from redis.asyncio.connection import AbstractConnection

from brokers.base import is_connection_failure
from runtime.errors import ResultStoreUnavailable

__all__ = ["CONNECTION_ERRORS", "Notifications", "Waiters", "connect"]

log = structlog.get_logger("runtime.results.redis")

#: redis-py's own "the connection is not usable" types.
CONNECTION_ERRORS = (rex.ConnectionError, rex.TimeoutError)
_CHANNELS_PER_COMMAND = 1000
#: Queued UNSUBSCRIBEs sent without waiting for a SUBSCRIBE to ride with.
_LAZY_UNSUBSCRIBES = 256


async def connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


class Waiters:
    """The waiters of one id's channel: woken once, by the first terminal result."""

    __slots__ = ("error", "fired", "note", "ready", "refs")

    def __init__(self) -> None:
        self.refs = 0
        self.ready = anyio.Event()  # the subscription is confirmed
        self.fired = anyio.Event()  # the completion message arrived
        self.note = b""  # the stored bytes from the message (empty: too big, GET it)
        self.error: ResultStoreUnavailable | None = None

    def fail(self, error: ResultStoreUnavailable) -> None:
        self.error = error
        self.ready.set()
        self.fired.set()

    def check(self) -> None:
        if self.error is not None:
            raise ResultStoreUnavailable(str(self.error)) from self.error.__cause__


class Notifications:
    """The completion channels being waited on, over one pub/sub connection."""

    def __init__(self, where: str,
                 errors: Callable[[str], AbstractContextManager[None]]) -> None:
        self._where = where
        self._errors = errors
        # desired channels, what was sent, what is still unconfirmed
        self._listener: AbstractConnection | None = None
        self._listener_lock = anyio.Lock()
        self._subs: dict[bytes, Waiters] = {}
        self._sent: set[bytes] = set()
        self._unconfirmed: dict[bytes, int] = {}
        self._dirty: set[bytes] = set()
        self._dirty_event = anyio.Event()

    def detach(self) -> AbstractConnection | None:
        """The listening connection, forgotten (the store closes it)."""
        listener, self._listener = self._listener, None
        return listener

    async def subscribe(self, channel: bytes, client: aioredis.Redis,
                        tg: anyio.abc.TaskGroup) -> Waiters:
        """The waiters of ``channel``, subscribed (or being subscribed) on the
        shared connection, which is opened in ``tg`` if need be."""
        await self._ensure_listener(client, tg)
        waiters = self._subs.get(channel)
        if waiters is None:
            waiters = self._subs[channel] = Waiters()
            if channel in self._sent and channel not in self._unconfirmed:
                waiters.ready.set()  # subscribed already (an unsubscribe is queued)
            else:
                self._mark_dirty(channel)
        waiters.refs += 1
        return waiters

    def unsubscribe(self, channel: bytes, waiters: Waiters) -> None:
        waiters.refs -= 1
        if waiters.refs <= 0 and self._subs.get(channel) is waiters:
            del self._subs[channel]
            self._mark_dirty(channel, lazy=True)

    def _mark_dirty(self, channel: bytes, *, lazy: bool = False) -> None:
        """Queue ``channel``'s (un)subscription. A lazy one (an UNSUBSCRIBE)
        rides with the next SUBSCRIBE, in the same write, unless
        ``_LAZY_UNSUBSCRIBES`` are queued: a channel left subscribed a while
        costs nothing (a completion channel is published once, and a message
        nobody waits for is dropped), a write per call does."""
        self._dirty.add(channel)
        if not lazy or len(self._dirty) >= _LAZY_UNSUBSCRIBES:
            self._dirty_event.set()

    async def _ensure_listener(self, client: aioredis.Redis, tg: anyio.abc.TaskGroup) -> None:
        if self._listener is not None:
            return
        async with self._listener_lock:
            if self._listener is not None:
                return
            pool = client.connection_pool
            # RESP2 so that pub/sub messages are plain replies; reads block forever.
            conn = pool.connection_class(
                **{**pool.connection_kwargs, "protocol": 2, "socket_timeout": None})
            with self._errors("wait for results"):
                await connect(conn)
            self._listener = conn
            tg.start_soon(self._listen, conn)

    async def _listen(self, conn: AbstractConnection) -> None:
        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:

                async def run(loop: Callable[[AbstractConnection], Awaitable[None]]) -> None:
                    nonlocal failure
                    try:
                        await loop(conn)
                    except Exception as e:
                        # whatever broke (a reset, a write on a closed transport, a
                        # reply it could not parse), the waiters are woken with
                        # ResultStoreUnavailable and the next wait reconnects: the
                        # listener never takes the store's task group down
                        if not is_connection_failure(e, CONNECTION_ERRORS):
                            log.error("result notifications failed", where=self._where,
                                      error_type=type(e).__name__, error=str(e))
                        failure = failure or e
                    tg.cancel_scope.cancel()

                tg.start_soon(run, self._send_subscriptions)
                tg.start_soon(run, self._read_notifications)
        finally:
            if failure is not None:
                log.warning("result notifications lost their connection", where=self._where,
                            error=f"{type(failure).__name__}: {failure}", waiters=len(self._subs))
                message = (f"lost the connection to the result store at {self._where} while "
                           f"waiting ({type(failure).__name__}: {failure}); check that Redis "
                           "is running; the wait can be retried")
            else:
                message = "the result store was closed while waiting"
            error = ResultStoreUnavailable(message)
            error.__cause__ = failure
            subs = self._subs
            self._listener = None
            self._subs, self._sent, self._unconfirmed, self._dirty = {}, set(), {}, set()
            for waiters in subs.values():
                waiters.fail(error)
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)

    async def _send_subscriptions(self, conn: AbstractConnection) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event = anyio.Event()
            dirty, self._dirty = self._dirty, set()
            subscribe = [c for c in dirty if c in self._subs and c not in self._sent]
            unsubscribe = [c for c in dirty if c not in self._subs and c in self._sent]
            for c in subscribe:
                self._sent.add(c)
                self._unconfirmed[c] = self._unconfirmed.get(c, 0) + 1
            self._sent.difference_update(unsubscribe)
            packed: list[bytes] = []
            for verb, channels in (("SUBSCRIBE", subscribe), ("UNSUBSCRIBE", unsubscribe)):
                for i in range(0, len(channels), _CHANNELS_PER_COMMAND):
                    packed += conn.pack_command(verb, *channels[i:i + _CHANNELS_PER_COMMAND])
            if packed:  # one write
                await conn.send_packed_command(packed, check_health=False)

    async def _read_notifications(self, conn: AbstractConnection) -> None:
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if not isinstance(reply, list) or len(reply) != 3:
                continue
            kind, channel, data = reply
            if kind == b"message":
                waiters = self._subs.pop(channel, None)
                if waiters is not None:  # one-shot: later waiters subscribe afresh
                    self._mark_dirty(channel, lazy=True)
                    waiters.note = data
                    # a waiter whose SUBSCRIBE is not confirmed yet must not wait
                    # for a confirmation that no longer finds it: it reads again
                    waiters.ready.set()
                    waiters.fired.set()
            elif kind == b"subscribe":
                left = self._unconfirmed.get(channel, 0) - 1
                if left > 0:
                    self._unconfirmed[channel] = left
                    continue
                self._unconfirmed.pop(channel, None)
                waiters = self._subs.get(channel)
                if waiters is not None and channel in self._sent:
                    waiters.ready.set()
