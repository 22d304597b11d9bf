"""The Redis result store: results, joins, claims and revocations in Redis.

Keys (``ns`` is the namespace, ``taskloom`` by default)::

    {ns}:result:{<id>}   string   b"T" or b"N" + msgpack(Result), PX ttl
                                  (T: terminal, so Lua can compare without decoding;
                                  enqueue(task_id=...) reserves it: N + PENDING, SET NX;
                                  with encryption keys, T/N + 0xC1 + msgpack([key id,
                                  Result without value nor error text, AES-GCM box]):
                                  base.encode_result)
    {ns}:ended:{<id>}    string   b"1", PX marker_ttl_s (two days for the default TTL of
                                  one day; base.marker_ttl_s): set with the first terminal
                                  result, outlives it; result gone + marker = expired.
                                  Additive: older writers set none (absence as before)
    {ns}:join:{<id>}     hash     member index -> msgpack(value) (or 0xC1 + sealed), PX ttl
    {ns}:claim:{<id>}    string   SET NX PX
    {ns}:revoked         zset     task id -> expiry (epoch ms), trimmed on revoke
    {ns}:done:<id>       channel  PUBLISHed once, when the first terminal result lands
    {ns}:update:<id>     channel  PUBLISHed (empty) on every stored record: updates()
    {ns}:revoke          channel  PUBLISHed with the id of each revoked task

Ids are hash-tagged (``{<id>}``) so that the keys of one id share a Redis
Cluster slot; the batched write below spans many ids, so this store targets
one Redis server (or a proxy that routes scripts), not Cluster as such.

Writing: concurrent ``put`` calls (and each ``put_many``) are gathered into
one round trip. The caller that opens a batch flushes it, after the flush in
flight if any; callers arriving meanwhile join the batch and await the same
flush. The batch is written by one Lua compare-and-set per 256 results that
never overwrites a terminal result and publishes the stored bytes (when small)
on the id's channel. Concurrent ``get`` calls are gathered into one MGET.

Waiting: one shared pub/sub connection per store (:mod:`runtime.results.notify`).
``wait_sent`` (``run``) subscribes, confirmed, before the task is sent, and
needs no read. Revocations: :mod:`runtime.results.revocations`.

Errors from redis-py leave this module only as taskloom errors:
``ConnectionFailed`` when the store cannot be opened, ``ResultStoreUnavailable``
when Redis cannot be reached (retryable), ``ResultError`` when Redis refuses.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog

from brokers.base import is_connection_failure, redact_url
from brokers.redis.options import check_client_url
from runtime.errors import (
    ConfigError,
    ConnectionFailed,
    EncodeError,
    PayloadTooLarge,
    ResultExpired,
    ResultTimeout,
)
from runtime.messages import Result, State
from runtime.results.base import (
    CANCELLED,
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TTL_S,
    encode_result,
    open_value,
    reservation,
    seal_value,
)
from runtime.results.base import marker_ttl_s as marker_ttl
from runtime.results.batching import Batcher
from runtime.results.notify import Notifications
from runtime.results.redis_wire import (
    Script,
    decode_stored,
    execute,
    glob_escape,
    mapped,
    pack,
    roundtrip,
)
from runtime.results.revocations import watch_revocations

if TYPE_CHECKING:
    from runtime.encryption import Keyring

__all__ = ["RedisResultStore"]

log = structlog.get_logger(__name__)

#: A terminal result up to this size rides in its completion message, so the
#: waiter needs no GET; a bigger one is fetched.
_INLINE_NOTIFY_BYTES = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 32
#: Results per EVALSHA: bounds how long one script call holds Redis.
_WRITES_PER_SCRIPT = 256
_INLINE_NOTIFY = b"%d" % _INLINE_NOTIFY_BYTES

# result key, marker key, completion channel, update channel, mark + msgpack, ttl ms
_Write = tuple[bytes, bytes, bytes, bytes, bytes, bytes]

_ENCODER = msgspec.msgpack.Encoder()

#: The batched compare-and-set write of results (first terminal wins).
_PUT = Script("put.lua")
#: Count a member into a join; the values in member order once all are in.
_JOIN = Script("join.lua")
#: Take a free claim, or renew one this holder has.
_CLAIM = Script("claim.lua")
#: Delete reservations that are still only that.
_RELEASE = Script("release.lua")


class RedisResultStore:
    """Results in Redis, shared by every process of an app.

    ``async with RedisResultStore.from_url("redis://host:6379/0") as store:``
    connects (``ConnectionFailed`` if Redis cannot be reached). Results expire
    after ``ttl_s``; a result encoded over ``max_result_bytes`` is refused with
    ``PayloadTooLarge`` so the worker can store a failure instead.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, ttl_s: float = DEFAULT_TTL_S,
                 namespace: str = "", max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
                 marker_ttl_s: float | None = None) -> None:
        if not 0 < ttl_s < math.inf:
            raise ConfigError(f"ttl_s must be a positive number of seconds, not {ttl_s!r}")
        if max_result_bytes <= 0:
            raise ConfigError(f"max_result_bytes must be positive, not {max_result_bytes!r}")
        if "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace {namespace!r} must not contain '{{' or '}}': they "
                              "would break the Redis Cluster hash tags of the keys")
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"a Redis result store URL starts with redis://, rediss:// or "
                              f"unix://, not {url!r}")
        self.ttl_s = ttl_s
        self._ttl_ms = b"%d" % max(1, int(ttl_s * 1000))
        #: how long an expiry marker lives after its task ends (base.py, promise 9)
        self.marker_ttl_s = marker_ttl(ttl_s) if marker_ttl_s is None else marker_ttl_s
        self._marker_ms = b"%d" % max(1, int(self.marker_ttl_s * 1000))
        self.max_result_bytes = max_result_bytes
        self.namespace = namespace
        self._url = url
        #: The Redis URL without taskloom's own query options.
        self.url = url
        self._where = (f"{parts.scheme}://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}"
                       f"{parts.path}" if parts.scheme != "unix" else f"unix://{parts.path}")
        ns = namespace or "taskloom"
        self._ns = ns
        self._revoked_key = f"{ns}:revoked"
        self._revoke_channel = f"{ns}:revoke".encode()
        self._redis: aioredis.Redis | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._writes: Batcher[_Write, bool] = Batcher(self._write)
        self._reads: Batcher[str, bytes | None] = Batcher(self._read)
        self._notify = Notifications(self._where, self._errors)
        # revocations: id -> monotonic expiry
        self._revoked: dict[str, float] = {}
        self._on_revoked: list[Callable[[str], None]] = []
        self._prune_revoked_at = 1024
        self._keyring: Keyring | None = None

    def use_keyring(self, keyring: Keyring | None) -> None:
        """Encrypt the value and error details of the results (and the join
        values) stored from now on with ``keyring``'s current key, and decrypt
        with any of its keys (the Runtime passes its codec's)."""
        self._keyring = keyring

    @classmethod
    def from_url(cls, url: str, *, ttl_s: float = DEFAULT_TTL_S, namespace: str = "",
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> RedisResultStore:
        """A store for ``url``; the query may set ``ttl_s`` and ``max_result_bytes``
        (they win over the arguments); every other query parameter goes to redis-py
        (``socket_timeout``, ``socket_connect_timeout``, ``max_connections``...)."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours = {k: v for k, v in query if k in ("ttl_s", "max_result_bytes")}
        rest = [(k, v) for k, v in query if k not in ours]
        try:
            if "ttl_s" in ours:
                ttl_s = float(ours["ttl_s"])
            if "max_result_bytes" in ours:
                max_result_bytes = int(ours["max_result_bytes"])
        except ValueError as e:
            raise ConfigError(f"bad result store URL parameter in {redact_url(url)}: {e}") from e
        clean = urlunsplit(parts._replace(query=urlencode(rest)))
        check_client_url(clean, ours=["max_result_bytes", "ttl_s"])
        return cls(clean, ttl_s=ttl_s, namespace=namespace, max_result_bytes=max_result_bytes)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._redis is not None:
            raise RuntimeError("this RedisResultStore is already open")
        # A bounded pool: callers beyond it queue for a connection (most calls are
        # batched anyway); URL parameters win over these defaults. RESP2: with
        # RESP3, redis-py 8 skips its check for pooled connections that the server
        # closed, so the first calls after a Redis restart would fail.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=_MAX_CONNECTIONS, timeout=_SOCKET_TIMEOUT_S,
            socket_connect_timeout=_CONNECT_TIMEOUT_S, socket_timeout=_SOCKET_TIMEOUT_S,
            protocol=2)
        client = aioredis.Redis.from_pool(pool)
        try:
            await execute(client, "PING")
            await self._load_scripts(client)
        except Exception as e:
            if not (isinstance(e, rex.RedisError) or is_connection_failure(e)):
                raise
            await client.aclose()
            raise ConnectionFailed(
                f"cannot open the result store at {self._where}: {type(e).__name__}: {e}; "
                "check the URL and that redis-server is running and reachable") from e
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._redis, self._tg = client, tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, tg = self._redis, self._tg
        if client is None or tg is None:
            return
        try:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        finally:
            self._redis = self._tg = None
            listener = self._notify.detach()  # set, but its task may never have run
            with anyio.CancelScope(shield=True):
                if listener is not None:
                    await listener.disconnect(nowait=True)
                await client.aclose()

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the result store is not open: use `async with store:`")
        return self._redis

    def _tg_(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("the result store is not open: use `async with store:`")
        return self._tg

    async def _load_scripts(self, client: aioredis.Redis) -> None:
        for script in (_PUT, _JOIN, _RELEASE):
            await execute(client, "SCRIPT LOAD", script.source)

    def _errors(self, doing: str) -> AbstractContextManager[None]:
        """Map redis-py errors to taskloom errors (:func:`redis_wire.mapped`)."""
        return mapped(self._where, doing)

    # -- keys ------------------------------------------------------------------------

    def _result_key(self, task_id: str) -> str:
        return f"{self._ns}:result:{{{task_id}}}"

    def _done_channel(self, task_id: str) -> str:
        return f"{self._ns}:done:{task_id}"

    def _marker_key(self, task_id: str) -> str:
        return f"{self._ns}:ended:{{{task_id}}}"

    # -- writing ---------------------------------------------------------------------

    def _encode(self, result: Result) -> _Write:
        body = encode_result(result, self.max_result_bytes, self._keyring)
        ns, task_id = self._ns, result.id
        ttl = self._ttl_ms if result.ttl_s is None else b"%d" % max(1, int(result.ttl_s * 1000))
        return (f"{ns}:result:{{{task_id}}}".encode(), f"{ns}:ended:{{{task_id}}}".encode(),
                f"{ns}:done:{task_id}".encode(), f"{ns}:update:{task_id}".encode(),
                (b"T" if result.state.terminal else b"N") + body, ttl)

    async def put(self, result: Result) -> bool:
        return (await self._writes.submit([self._encode(result)]))[0]

    async def put_many(self, results: Sequence[Result]) -> list[bool]:
        if not results:
            return []
        return await self._writes.submit([self._encode(r) for r in results])

    async def _write(self, items: list[_Write]) -> list[bool]:
        """One EVALSHA per chunk of results, all chunks in one write (packed here:
        redis-py's per-command overhead would cost more than Redis itself)."""
        client = self._client()
        chunks = [items[i:i + _WRITES_PER_SCRIPT]
                  for i in range(0, len(items), _WRITES_PER_SCRIPT)]
        replies: list[Any] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        for attempt in range(2):
            commands = []
            for c in todo:
                chunk = chunks[c]
                args: list[bytes] = [b"EVALSHA", _PUT.sha.encode(), b"%d" % (2 * len(chunk))]
                for key, marker, _, _, _, _ in chunk:
                    args += (key, marker)
                args += (_INLINE_NOTIFY, self._marker_ms)
                for _, _, channel, update, data, ttl in chunk:
                    args += (data, channel, update, ttl)
                commands.append(pack(args))
            with self._errors("store results"):
                for c, reply in zip(todo, await roundtrip(client, commands), strict=True):
                    replies[c] = reply
            todo = [c for c in todo if isinstance(replies[c], rex.NoScriptError)]
            if not todo or attempt:
                break
            with self._errors("load the result scripts"):
                await self._load_scripts(client)  # Redis restarted and lost its scripts
        stored: list[bool] = []
        for reply in replies:
            if isinstance(reply, Exception):
                with self._errors("store results"):
                    raise reply
            stored.extend(flag == 1 for flag in reply)
        return stored

    async def _eval(self, script: Script, keys: str | Sequence[str], args: Sequence[Any],
                    doing: str) -> Any:
        client = self._client()
        keys = [keys] if isinstance(keys, str) else list(keys)
        with self._errors(doing):
            try:
                return await execute(client, "EVALSHA", script.sha, len(keys), *keys, *args)
            except rex.NoScriptError:
                await self._load_scripts(client)
                return await execute(client, "EVALSHA", script.sha, len(keys), *keys, *args)

    # -- reading ---------------------------------------------------------------------

    async def get(self, task_id: str) -> Result | None:
        raw = (await self._reads.submit([self._result_key(task_id)]))[0]
        return None if raw is None else decode_stored(task_id, raw, self._keyring)

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        with self._errors("read results"):
            values: list[bytes | None] = await execute(self._client(), "MGET", *keys)
        return values

    async def wait(self, task_id: str, timeout: float) -> Result:
        seen = [State.PENDING]
        if timeout > 0:
            with anyio.move_on_after(timeout):
                return await self._wait(task_id, seen)
        else:
            current = await self._first_read(task_id)
            if current is not None and current.state.terminal:
                return current
            seen[0] = current.state if current else State.PENDING
        raise ResultTimeout(task_id, timeout, seen[0])

    async def _first_read(self, task_id: str) -> Result | None:
        """The record of ``task_id``, read with its expiry marker in the same
        MGET; ``ResultExpired`` if only the marker is left."""
        raw, marker = await self._reads.submit([self._result_key(task_id),
                                                self._marker_key(task_id)])
        if raw is None:
            if marker is not None:
                raise ResultExpired(task_id, self.ttl_s)
            return None
        return decode_stored(task_id, raw, self._keyring)

    async def _wait(self, task_id: str, seen: list[State]) -> Result:
        current = await self._first_read(task_id)
        while current is None or not current.state.terminal:
            if current is not None:
                seen[0] = current.state
            channel = self._done_channel(task_id).encode()
            waiters = await self._notify.subscribe(channel, self._client(), self._tg_())
            try:
                await waiters.ready.wait()
                waiters.check()
                current = await self.get(task_id)  # stored before we subscribed?
                if current is not None and current.state.terminal:
                    break
                await waiters.fired.wait()
                waiters.check()
                if len(waiters.note) > 1:
                    current = decode_stored(task_id, waiters.note, self._keyring)
                else:
                    current = await self.get(task_id)
            finally:
                self._notify.unsubscribe(channel, waiters)
        return current

    async def wait_sent(self, task_id: str, timeout: float,
                        send: Callable[[], Awaitable[None]]) -> Result:
        """``send()`` the task of a fresh id, then its terminal result, in two
        round trips: the id's completion channel is subscribed, and the
        subscription confirmed, before ``send`` is called. Nothing can be
        stored under a fresh id before it is sent, so its completion message
        is published after Redis has the subscription: no read is needed
        (the inline bytes of the message are the result; a bigger one is
        fetched). A store that does not confirm the subscription within
        ``timeout`` does not stop the task being sent: ``ResultTimeout``."""
        if timeout <= 0:
            await send()
            return await self.wait(task_id, timeout)
        deadline = anyio.current_time() + timeout
        channel = self._done_channel(task_id).encode()
        waiters = await self._notify.subscribe(channel, self._client(), self._tg_())
        try:
            with anyio.move_on_after(deadline - anyio.current_time()):
                await waiters.ready.wait()
            waiters.check()  # the store is unreachable: raised before anything is sent
            await send()
            if waiters.ready.is_set():
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await waiters.fired.wait()
                    waiters.check()
                    if len(waiters.note) > 1:
                        return decode_stored(task_id, waiters.note, self._keyring)
                    return await self._wait(task_id, [State.PENDING])  # too big to ride along
        finally:
            self._notify.unsubscribe(channel, waiters)
        raise ResultTimeout(task_id, timeout, State.PENDING)

    async def updates(self, task_id: str) -> AsyncIterator[Result]:
        """Each new record of ``task_id`` (state, progress) until a terminal one:
        woken by the id's update channel, then one GET (records written
        between two wake-ups coalesce into the latest)."""
        last: Result | None = None
        channel = f"{self._ns}:update:{task_id}".encode()
        while True:
            waiters = await self._notify.subscribe(channel, self._client(), self._tg_())
            try:
                await waiters.ready.wait()
                waiters.check()
                current = await self.get(task_id)
                if current is not None and current != last:
                    last = current
                    yield current
                    if current.state.terminal:
                        return
                await waiters.fired.wait()
                waiters.check()
            finally:
                self._notify.unsubscribe(channel, waiters)

    # -- revocation ------------------------------------------------------------------

    async def revoke(self, task_id: str) -> bool:
        stored = await self.put(Result(id=task_id, state=State.REVOKED, error=CANCELLED,
                                       finished_ms=int(time.time() * 1000)))
        if not stored:
            current = await self.get(task_id)
            if current is None or current.state is not State.REVOKED:
                return False
            # Already REVOKED: announce again (idempotent), in case an earlier
            # revoke stored the result but failed to announce it.
        self._note_revoked(task_id, self.ttl_s)
        now_ms = int(time.time() * 1000)
        pipe = self._client().pipeline(transaction=False)
        pipe.execute_command("ZADD", self._revoked_key, now_ms + int(self.ttl_s * 1000), task_id)
        pipe.execute_command("ZREMRANGEBYSCORE", self._revoked_key, "-inf", now_ms)
        pipe.execute_command("PEXPIRE", self._revoked_key, max(1, int(self.ttl_s * 1000)))
        pipe.execute_command("PUBLISH", self._revoke_channel, task_id)
        with self._errors(f"announce the revocation of task {task_id}"):
            await pipe.execute()
        return stored

    def is_revoked(self, task_id: str) -> bool:
        return task_id in self._revoked

    def listen_revoked(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(task_id)`` on each revocation this store learns of
        (its own ``revoke`` and, while ``watch`` runs, every other process's);
        returns the way to stop."""
        self._on_revoked.append(callback)
        return lambda: self._on_revoked.remove(callback)

    def _note_revoked(self, task_id: str, ttl_s: float) -> None:
        self._revoked[task_id] = time.monotonic() + ttl_s
        for callback in self._on_revoked:
            callback(task_id)
        if len(self._revoked) >= self._prune_revoked_at:
            now = time.monotonic()
            self._revoked = {k: t for k, t in self._revoked.items() if t > now}
            self._prune_revoked_at = max(1024, 2 * len(self._revoked))

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep ``is_revoked`` up to date until cancelled: subscribe to revocations,
        then load the recent ones. Reconnects with backoff when the connection
        drops; raises ``ResultStoreUnavailable`` if the first connection fails."""
        await watch_revocations(self._client(), self._where, self._revoke_channel,
                                self._revoked_key, self._note_revoked,
                                lambda: self.ttl_s, task_status=task_status)

    # -- expiry and reservations -----------------------------------------------------

    async def expired(self, task_id: str) -> bool:
        try:
            await self._first_read(task_id)
        except ResultExpired:
            return True
        return False

    async def reserve(self, task_ids: Sequence[str]) -> list[bool]:
        """``SET NX PX ttl`` of a PENDING record per id, all in one round trip."""
        if not task_ids:
            return []
        ttl = self._ttl_ms
        commands = [pack((b"SET", self._result_key(t).encode(), reservation(t), b"NX", b"PX", ttl))
                    for t in task_ids]
        with self._errors("reserve task ids"):
            replies = await roundtrip(self._client(), commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return [reply is not None for reply in replies]

    async def release(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            keys = [self._result_key(t) for t in task_ids]
            await self._eval(_RELEASE, keys, [reservation(t) for t in task_ids],
                             "release reserved task ids")

    # -- joins and claims ------------------------------------------------------------

    async def join(self, join_id: str, index: int, size: int, value: Any) -> list[Any] | None:
        if not 0 <= index < size:
            raise ValueError(f"join member index {index} is outside 0..{size - 1}")
        try:
            data = seal_value(_ENCODER.encode(value), join_id, index, self._keyring)
        except (TypeError, OverflowError, RecursionError) as e:
            raise EncodeError(f"member {index} of join {join_id} cannot be encoded: {e}") from None
        if len(data) > self.max_result_bytes:
            raise PayloadTooLarge(len(data), self.max_result_bytes,
                                  f"value of member {index} of join {join_id}")
        reply = await self._eval(_JOIN, f"{self._ns}:join:{{{join_id}}}",
                                 (index, size, data, max(1, int(self.ttl_s * 1000))),
                                 f"count member {index} of join {join_id}")
        if reply is None or any(v is None for v in reply):
            return None
        return [open_value(v, join_id, i, self._keyring) for i, v in enumerate(reply)]

    async def claim(self, task_id: str, ttl_s: float, *, holder: str = "") -> bool:
        key = f"{self._ns}:claim:{{{task_id}}}"
        ttl_ms = max(1, int(ttl_s * 1000))
        with self._errors(f"claim task {task_id}"):
            if not holder:
                reply = await execute(self._client(), "SET", key, b"1", "NX", "PX", ttl_ms)
            else:
                reply = await execute(self._client(), "EVAL", _CLAIM.source, 1, key,
                                       holder.encode(), ttl_ms)
        return bool(reply)

    # -- tests -----------------------------------------------------------------------

    async def purge_namespace(self) -> int:
        """Delete every key of this store's namespace (SCAN + UNLINK, never FLUSH);
        for tests. Returns how many keys were deleted."""
        if not self.namespace:
            raise ConfigError("purge_namespace needs a store with a namespace; "
                              "refusing to delete the default 'taskloom' keys")
        client = self._client()
        deleted = 0
        cursor = 0
        with self._errors(f"purge namespace {self.namespace}"):
            while True:
                cursor, keys = await execute(
                    client, "SCAN", cursor, "MATCH", glob_escape(self._ns) + ":*", "COUNT", 1000)
                if keys:
                    deleted += await execute(client, "UNLINK", *keys)
                if int(cursor) == 0:
                    return deleted
