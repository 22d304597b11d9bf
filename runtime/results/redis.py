"""The Redis result store: results, joins, claims and revocations in Redis.

Keys (``ns`` is the namespace, ``taskloom`` by default)::

    {ns}:result:{<id>}   string   b"T" or b"N" + msgpack(Result), PX ttl
                                  (T: terminal, so Lua can compare without decoding)
    {ns}:join:{<id>}     hash     member index -> msgpack(value), PX ttl
    {ns}:claim:{<id>}    string   SET NX PX
    {ns}:revoked         zset     task id -> expiry (epoch ms), trimmed on revoke
    {ns}:done:<id>       channel  PUBLISHed once, when the first terminal result lands
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

Waiting: one shared pub/sub connection per store, run in the store's task
group, holds the channels of the ids being waited on and wakes their waiters.
A waiter reads first, subscribes only when there is no terminal result yet,
then reads again once the subscription is confirmed (so a result stored in
between is never missed). When the connection breaks, every waiter raises
``ResultStoreUnavailable`` at once; the next ``wait`` reconnects.

Errors from redis-py leave this module only as taskloom errors:
``ConnectionFailed`` when the store cannot be opened, ``ResultStoreUnavailable``
when Redis cannot be reached (retryable), ``ResultError`` when Redis refuses.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog
from redis.asyncio.connection import AbstractConnection

from brokers.base import is_connection_failure
from runtime.errors import (
    ConfigError,
    ConnectionFailed,
    DecodeError,
    EncodeError,
    PayloadTooLarge,
    ResultError,
    ResultStoreUnavailable,
    ResultTimeout,
)
from runtime.messages import Result, State
from runtime.results import CANCELLED, DEFAULT_MAX_RESULT_BYTES, DEFAULT_TTL_S, encode_result

__all__ = ["RedisResultStore"]

log = structlog.get_logger(__name__)

#: A terminal result up to this size rides in its completion message, so the
#: waiter needs no GET; a bigger one is fetched.
_INLINE_NOTIFY_BYTES = 64 * 1024
#: redis-py's own "the connection is not usable" types (see ``_errors``).
_CONNECTION_ERRORS = (rex.ConnectionError, rex.TimeoutError)
#: Longest pause (before jitter) of the revocation watch between reconnections.
_WAIT_RETRY_MAX_S = 2.0
_CONNECT_TIMEOUT_S = 5.0
_SOCKET_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 32
_CHANNELS_PER_COMMAND = 1000
#: Results per EVALSHA: bounds how long one script call holds Redis.
_WRITES_PER_SCRIPT = 256
_INLINE_NOTIFY = b"%d" % _INLINE_NOTIFY_BYTES
#: Redis replies that mean "not now" rather than "never": the caller may retry.
_TRANSIENT = ("LOADING", "READONLY", "OOM", "MISCONF", "BUSY", "MASTERDOWN", "TRYAGAIN",
              "CLUSTERDOWN")

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_Write = tuple[bytes, bytes, bytes]  # result key, completion channel, mark + msgpack

_ENCODER = msgspec.msgpack.Encoder()
_RESULT_DECODER = msgspec.msgpack.Decoder(Result)
_VALUE_DECODER = msgspec.msgpack.Decoder()

_PUT_LUA = """
-- KEYS: result keys. ARGV[1] ttl ms, ARGV[2] inline limit, then per key:
-- mark + msgpack, completion channel. Returns 1 (stored) or 0 per key.
local ttl, limit, out = ARGV[1], tonumber(ARGV[2]), {}
for i, key in ipairs(KEYS) do
  local data, channel = ARGV[2 * i + 1], ARGV[2 * i + 2]
  if redis.call('GETRANGE', key, 0, 0) == 'T' then
    out[i] = 0
  else
    redis.call('SET', key, data, 'PX', ttl)
    if string.byte(data, 1) == 84 then  -- 'T': the first terminal result
      if #data <= limit then redis.call('PUBLISH', channel, data)
      else redis.call('PUBLISH', channel, '') end
    end
    out[i] = 1
  end
end
return out
"""

_JOIN_LUA = """
-- KEYS[1] join hash; ARGV[1] index; ARGV[2] size; ARGV[3] msgpack value; ARGV[4] ttl ms
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local size = tonumber(ARGV[2])
if redis.call('HLEN', KEYS[1]) < size then return false end
local out, fields = {}, {}
for i = 0, size - 1 do
  fields[#fields + 1] = tostring(i)
  if #fields == 1000 or i == size - 1 then
    local values = redis.call('HMGET', KEYS[1], unpack(fields))
    for j = 1, #values do out[#out + 1] = values[j] end
    fields = {}
  end
end
return out
"""


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_PUT = _Script(_PUT_LUA)
_JOIN = _Script(_JOIN_LUA)


class _Waiters:
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


class _Batch(Generic[_In, _Out]):
    """Calls gathered for one flush, and its outcome."""

    __slots__ = ("done", "error", "items", "outcomes")

    def __init__(self) -> None:
        self.items: list[_In] = []
        self.outcomes: list[_Out] = []
        self.error: BaseException | None = None
        self.done = anyio.Event()


class _Batcher(Generic[_In, _Out]):
    """Gathers concurrent calls into one round trip. The caller that opens a
    batch flushes it, after the flush in flight if any; callers arriving in the
    meantime join the open batch and await that same flush."""

    def __init__(self, flush: Callable[[list[_In]], Awaitable[list[_Out]]]) -> None:
        self._flush = flush
        self._open: _Batch[_In, _Out] | None = None
        self._lock = anyio.Lock()

    async def submit(self, items: Sequence[_In]) -> list[_Out]:
        batch = self._open
        leader = batch is None
        if batch is None:
            batch = self._open = _Batch()
        start = len(batch.items)
        batch.items.extend(items)
        if leader:
            # Shielded: the callers that joined this batch depend on its flush.
            with anyio.CancelScope(shield=True):
                try:
                    async with self._lock:
                        if self._open is batch:
                            self._open = None
                        batch.outcomes = await self._flush(batch.items)
                except BaseException as e:
                    batch.error = e
                    raise
                finally:
                    batch.done.set()
        else:
            await batch.done.wait()
            if batch.error is not None:
                error = batch.error
                if isinstance(error, ResultStoreUnavailable):
                    raise ResultStoreUnavailable(str(error)) from error
                raise ResultError(str(error)) from error
        return batch.outcomes[start:start + len(items)]


#: Take a free claim, or renew one this holder has.
_CLAIM_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""


def _decode_stored(task_id: str, raw: bytes) -> Result:
    try:
        return _RESULT_DECODER.decode(memoryview(raw)[1:])
    except msgspec.MsgspecError as e:
        raise DecodeError("bad_result", f"the stored result of task {task_id} "
                          f"cannot be decoded ({e}); it was not written by taskloom") from e


async def _execute(client: aioredis.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def _connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


def _pack(args: Sequence[bytes]) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisResultStore:
    """Results in Redis, shared by every process of an app.

    ``async with RedisResultStore.from_url("redis://host:6379/0") as store:``
    connects (``ConnectionFailed`` if Redis cannot be reached). Results expire
    after ``ttl_s``; a result encoded over ``max_result_bytes`` is refused with
    ``PayloadTooLarge`` so the worker can store a failure instead.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, ttl_s: float = DEFAULT_TTL_S,
                 namespace: str = "",
                 max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> None:
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
        self._writes: _Batcher[_Write, bool] = _Batcher(self._write)
        self._reads: _Batcher[str, bytes | None] = _Batcher(self._read)
        # waiting: desired channels, what was sent, what is still unconfirmed
        self._listener: AbstractConnection | None = None
        self._listener_lock = anyio.Lock()
        self._subs: dict[bytes, _Waiters] = {}
        self._sent: set[bytes] = set()
        self._unconfirmed: dict[bytes, int] = {}
        self._dirty: set[bytes] = set()
        self._dirty_event = anyio.Event()
        # revocations: id -> monotonic expiry
        self._revoked: dict[str, float] = {}
        self._prune_revoked_at = 1024

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
            raise ConfigError(f"bad result store URL parameter in {url!r}: {e}") from e
        clean = urlunsplit(parts._replace(query=urlencode(rest)))
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
            await _execute(client, "PING")
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
            listener, self._listener = self._listener, None  # set, but its task never ran
            with anyio.CancelScope(shield=True):
                if listener is not None:
                    await listener.disconnect(nowait=True)
                await client.aclose()

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the result store is not open: use `async with store:`")
        return self._redis

    async def _load_scripts(self, client: aioredis.Redis) -> None:
        for script in (_PUT, _JOIN):
            await _execute(client, "SCRIPT LOAD", script.source)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Map redis-py errors to taskloom errors at the boundary: every connection
        failure (as :func:`brokers.base.is_connection_failure` sees it: resets,
        timeouts, a write on a transport a reset closed) is ``ResultStoreUnavailable``."""
        try:
            yield
        except (ResultError, DecodeError, EncodeError):
            raise
        except rex.ResponseError as e:
            if str(e).startswith(_TRANSIENT):
                raise ResultStoreUnavailable(
                    f"could not {doing}: the result store at {self._where} refused for now "
                    f"({e}); the call can be retried once Redis recovers") from e
            raise ResultError(f"could not {doing}: Redis at {self._where} refused: {e}") from e
        except Exception as e:
            if is_connection_failure(e, _CONNECTION_ERRORS):
                raise ResultStoreUnavailable(
                    f"could not {doing}: the result store at {self._where} is unreachable "
                    f"({type(e).__name__}: {e}); check that Redis is running; "
                    "the call can be retried") from e
            if isinstance(e, rex.RedisError):
                raise ResultError(f"could not {doing} in the result store at {self._where}: "
                                  f"{type(e).__name__}: {e}") from e
            raise

    # -- keys ------------------------------------------------------------------------

    def _result_key(self, task_id: str) -> str:
        return f"{self._ns}:result:{{{task_id}}}"

    def _done_channel(self, task_id: str) -> str:
        return f"{self._ns}:done:{task_id}"

    # -- writing ---------------------------------------------------------------------

    def _encode(self, result: Result) -> _Write:
        body = encode_result(result, self.max_result_bytes)
        ns, task_id = self._ns, result.id
        return (f"{ns}:result:{{{task_id}}}".encode(), f"{ns}:done:{task_id}".encode(),
                (b"T" if result.state.terminal else b"N") + body)

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
        ttl = b"%d" % max(1, int(self.ttl_s * 1000))
        chunks = [items[i:i + _WRITES_PER_SCRIPT]
                  for i in range(0, len(items), _WRITES_PER_SCRIPT)]
        replies: list[Any] = [None] * len(chunks)
        todo = list(range(len(chunks)))
        for attempt in range(2):
            commands = []
            for c in todo:
                chunk = chunks[c]
                args: list[bytes] = [b"EVALSHA", _PUT.sha.encode(), b"%d" % len(chunk)]
                args.extend(key for key, _, _ in chunk)
                args += (ttl, _INLINE_NOTIFY)
                for _, channel, data in chunk:
                    args += (data, channel)
                commands.append(_pack(args))
            with self._errors("store results"):
                for c, reply in zip(todo, await self._roundtrip(client, commands), strict=True):
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

    async def _roundtrip(self, client: aioredis.Redis, commands: list[bytes]) -> list[Any]:
        """Send packed commands in one write; their replies (errors in place)."""
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(commands, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except rex.ResponseError as e:  # read in full: the next reply follows
                    replies.append(e)
            return replies
        finally:
            await pool.release(conn)

    async def _eval(self, script: _Script, key: str, args: Sequence[Any], doing: str) -> Any:
        client = self._client()
        with self._errors(doing):
            try:
                return await _execute(client, "EVALSHA", script.sha, 1, key, *args)
            except rex.NoScriptError:
                await self._load_scripts(client)
                return await _execute(client, "EVALSHA", script.sha, 1, key, *args)

    # -- reading ---------------------------------------------------------------------

    async def get(self, task_id: str) -> Result | None:
        raw = (await self._reads.submit([self._result_key(task_id)]))[0]
        return None if raw is None else _decode_stored(task_id, raw)

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        with self._errors("read results"):
            values: list[bytes | None] = await _execute(self._client(), "MGET", *keys)
        return values

    async def wait(self, task_id: str, timeout: float) -> Result:
        seen = [State.PENDING]
        if timeout > 0:
            with anyio.move_on_after(timeout):
                return await self._wait(task_id, seen)
        else:
            current = await self.get(task_id)
            if current is not None and current.state.terminal:
                return current
            seen[0] = current.state if current else State.PENDING
        raise ResultTimeout(task_id, timeout, seen[0])

    async def _wait(self, task_id: str, seen: list[State]) -> Result:
        current = await self.get(task_id)
        while current is None or not current.state.terminal:
            if current is not None:
                seen[0] = current.state
            channel = self._done_channel(task_id).encode()
            waiters = await self._subscribe(channel)
            try:
                await waiters.ready.wait()
                waiters.check()
                current = await self.get(task_id)  # stored before we subscribed?
                if current is not None and current.state.terminal:
                    break
                await waiters.fired.wait()
                waiters.check()
                if len(waiters.note) > 1:
                    current = _decode_stored(task_id, waiters.note)
                else:
                    current = await self.get(task_id)
            finally:
                self._unsubscribe(channel, waiters)
        return current

    async def _subscribe(self, channel: bytes) -> _Waiters:
        await self._ensure_listener()
        waiters = self._subs.get(channel)
        if waiters is None:
            waiters = self._subs[channel] = _Waiters()
            if channel in self._sent and channel not in self._unconfirmed:
                waiters.ready.set()  # subscribed already (an unsubscribe is queued)
            else:
                self._mark_dirty(channel)
        waiters.refs += 1
        return waiters

    def _unsubscribe(self, channel: bytes, waiters: _Waiters) -> None:
        waiters.refs -= 1
        if waiters.refs <= 0 and self._subs.get(channel) is waiters:
            del self._subs[channel]
            self._mark_dirty(channel)

    def _mark_dirty(self, channel: bytes) -> None:
        self._dirty.add(channel)
        self._dirty_event.set()

    async def _ensure_listener(self) -> None:
        if self._listener is not None:
            return
        async with self._listener_lock:
            if self._listener is not None:
                return
            client = self._client()
            assert self._tg is not None
            pool = client.connection_pool
            # RESP2 so that pub/sub messages are plain replies; reads block forever.
            conn = pool.connection_class(
                **{**pool.connection_kwargs, "protocol": 2, "socket_timeout": None})
            with self._errors("wait for results"):
                await _connect(conn)
            self._listener = conn
            self._tg.start_soon(self._listen, conn)

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
                        if not is_connection_failure(e, _CONNECTION_ERRORS):
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
            for verb, channels in (("SUBSCRIBE", subscribe), ("UNSUBSCRIBE", unsubscribe)):
                for i in range(0, len(channels), _CHANNELS_PER_COMMAND):
                    await conn.send_command(verb, *channels[i:i + _CHANNELS_PER_COMMAND],
                                            check_health=False)

    async def _read_notifications(self, conn: AbstractConnection) -> None:
        while True:
            reply = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
            if not isinstance(reply, list) or len(reply) != 3:
                continue
            kind, channel, data = reply
            if kind == b"message":
                waiters = self._subs.pop(channel, None)
                if waiters is not None:  # one-shot: later waiters subscribe afresh
                    self._mark_dirty(channel)
                    waiters.note = data
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

    def _note_revoked(self, task_id: str, ttl_s: float) -> None:
        self._revoked[task_id] = time.monotonic() + ttl_s
        if len(self._revoked) >= self._prune_revoked_at:
            now = time.monotonic()
            self._revoked = {k: t for k, t in self._revoked.items() if t > now}
            self._prune_revoked_at = max(1024, 2 * len(self._revoked))

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep ``is_revoked`` up to date until cancelled: subscribe to revocations,
        then load the recent ones. Reconnects with backoff when the connection
        drops; raises ``ResultStoreUnavailable`` if the first connection fails."""
        started = False
        backoff = 0.1
        down_since: float | None = None
        while True:
            client = self._client()
            pool = client.connection_pool
            conn = pool.connection_class(
                **{**pool.connection_kwargs, "protocol": 2, "socket_timeout": None})
            try:
                with self._errors("watch revocations"):
                    await _connect(conn)
                    await conn.send_command("SUBSCRIBE", self._revoke_channel,
                                            check_health=False)
                    while True:  # the confirmation
                        reply = await conn.read_response(timeout=math.inf)
                        if isinstance(reply, list) and reply[:1] == [b"subscribe"]:
                            break
                    now_ms = int(time.time() * 1000)
                    recent = await _execute(
                        client, "ZRANGE", self._revoked_key, now_ms, "+inf", "BYSCORE", "WITHSCORES")
                for task_id, expires_ms in _pairs(recent):
                    self._note_revoked(task_id, (expires_ms - now_ms) / 1000)
                if not started:
                    started = True
                    task_status.started()
                if down_since is not None:
                    log.warning("revocation watch reconnected", where=self._where,
                                down_s=round(time.monotonic() - down_since, 2))
                    down_since = None
                backoff = 0.1
                with self._errors("watch revocations"):
                    while True:
                        reply = await conn.read_response(timeout=math.inf)
                        if (isinstance(reply, list) and len(reply) == 3
                                and reply[0] == b"message"):
                            self._note_revoked(reply[2].decode(), self.ttl_s)
            except ResultStoreUnavailable as e:
                if not started:
                    raise
                if down_since is None:  # one line per outage, not one per attempt
                    down_since = time.monotonic()
                    log.warning("revocation watch lost its connection; reconnecting with "
                                "backoff", where=self._where, error=str(e))
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.disconnect(nowait=True)
            await anyio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _WAIT_RETRY_MAX_S)

    # -- joins and claims ------------------------------------------------------------

    async def join(self, join_id: str, index: int, size: int, value: Any) -> list[Any] | None:
        if not 0 <= index < size:
            raise ValueError(f"join member index {index} is outside 0..{size - 1}")
        try:
            data = _ENCODER.encode(value)
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
        return [_VALUE_DECODER.decode(v) for v in reply]

    async def claim(self, task_id: str, ttl_s: float, *, holder: str = "") -> bool:
        key = f"{self._ns}:claim:{{{task_id}}}"
        ttl_ms = max(1, int(ttl_s * 1000))
        with self._errors(f"claim task {task_id}"):
            if not holder:
                reply = await _execute(self._client(), "SET", key, b"1", "NX", "PX", ttl_ms)
            else:
                reply = await _execute(self._client(), "EVAL", _CLAIM_SCRIPT, 1, key,
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
                cursor, keys = await _execute(
                    client, "SCAN", cursor, "MATCH", _glob_escape(self._ns) + ":*", "COUNT", 1000)
                if keys:
                    deleted += await _execute(client, "UNLINK", *keys)
                if int(cursor) == 0:
                    return deleted


def _pairs(reply: Any) -> Iterator[tuple[str, float]]:
    """ZRANGE ... WITHSCORES as (member, score), whether RESP2 (flat) or RESP3 (pairs)."""
    if reply and isinstance(reply[0], list | tuple):
        for member, score in reply:
            yield member.decode(), float(score)
    else:
        for i in range(0, len(reply or ()), 2):
            yield reply[i].decode(), float(reply[i + 1])
