"""The broker: connecting, publishing, consuming, inspecting.

Publishing is one ``XADD`` (a message for now) or one script call
(``lua/publish.lua``: a delayed message goes to the delayed set, scored on the
Redis clock); ``publish_many`` sends ``publish_chunk`` messages per script call,
all in one round trip. With ``min_replicas`` a publish also ``WAIT``s on its
connection for that many replicas and raises ``PublishError`` when fewer
acknowledged in time. ``stats``, ``purge`` and ``dead_letters`` first flush the
settlements this broker's consumers have queued (read your own writes).

On connect it logs an error when ``maxmemory-policy`` is not ``noeviction``
(Redis could evict queued messages) and a warning when this host's clock is
more than ``CLOCK_SKEW_WARN_S`` off Redis's.

Limits: a consumer of several queues issues multi-key commands across their hash
slots; on Redis Cluster give each consumer one queue. On Redis < 7.0 there is no
``XAUTOCLAIM`` deleted-id report (7.0 is required).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.maint_notifications import MaintNotificationsConfig

from brokers.base import (
    BrokerError,
    Capabilities,
    ConfigError,
    ConnectionFailed,
    DeadLetter,
    Envelope,
    PublishError,
    QueueStats,
    is_connection_failure,
    redact_url,
)
from brokers.redis.consumer import RedisConsumer
from brokers.redis.errors import as_broker_error, mapped, unwrapped
from brokers.redis.keys import BANDS, Queue, band_of, decode, encode
from brokers.redis.options import RedisBrokerOptions, parse_url
from brokers.redis.scripts import ALL as ALL_SCRIPTS
from brokers.redis.scripts import PUBLISH, PURGE, STATS, Call, cmd, evalsha, evalsha_many

__all__ = ["CLOCK_SKEW_WARN_S", "RedisBroker"]

log = structlog.get_logger("brokers.redis")

#: A host clock further than this from Redis's is logged at connect (RELIABILITY G1).
CLOCK_SKEW_WARN_S = 5.0


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


class RedisBroker:
    """Redis Streams broker. ``RedisBroker.from_url("redis://localhost:6379/0")``."""

    def __init__(self, url: str = "redis://localhost:6379/0", *, namespace: str = "",
                 options: RedisBrokerOptions | None = None) -> None:
        if "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace {namespace!r} must not contain '{{' or '}}': they "
                             "would break the per-queue Redis Cluster hash tags")
        self.url = url
        self.namespace = namespace
        self.options = options or RedisBrokerOptions()
        self.capabilities = Capabilities(max_priority=BANDS - 1, native_delay=True,
                                         max_message_bytes=self.options.max_message_bytes,
                                         lease_s=self.options.lease_s)
        self._prefix = f"{namespace}:" if namespace else "taskloom:"
        self._queues: dict[str, Queue] = {}
        self._consumers: set[RedisConsumer] = set()
        self._redis: aioredis.Redis | None = None

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "") -> RedisBroker:
        """``redis://``, ``rediss://`` or ``unix://`` URL; query parameters named
        like :class:`RedisBrokerOptions` fields configure the broker, the others
        go to redis-py."""
        url, options = parse_url(url)
        return cls(url, namespace=namespace, options=options)

    # -- connection --------------------------------------------------------------------

    def _client(self, **overrides: Any) -> aioredis.Redis:
        kwargs: dict[str, Any] = {
            # No silent retry inside redis-py: a script whose reply timed out may
            # have run (a fetch that filled the pending list, a settlement); the
            # consumer's own recovery knows how to check, a blind resend does not.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=0),
            # Maintenance notifications off: with them on (redis-py 8.1's default
            # "auto") the pool skips its check-out test for a connection the
            # server closed while it sat idle (EOF seen), so the next command
            # goes out on it and fails ("Connection closed by server") after any
            # Redis restart, though nothing reached the server (redis-py#4252,
            # fixed after 8.1 by #4260). With them off the pool reconnects such
            # a connection before sending: no command is ever resent.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
            "socket_connect_timeout": 5.0,
            "socket_timeout": 10.0,
            **overrides,
        }
        try:
            return aioredis.Redis.from_url(self.url, **kwargs)
        except ValueError as e:
            raise ConfigError(f"invalid Redis URL {redact_url(self.url)}: {e}") from None

    @property
    def _redis_client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BrokerError("the Redis broker is not connected: use `async with broker:`")
        return self._redis

    async def __aenter__(self) -> Self:
        if self._redis is not None:
            return self
        client = self._client()
        try:
            await client.ping()
            pipe = client.pipeline(transaction=False)
            for script in ALL_SCRIPTS:
                pipe.execute_command("SCRIPT", "LOAD", script.source)
            await pipe.execute()
        except Exception as e:
            if not (isinstance(e, rex.RedisError) or is_connection_failure(e)):
                raise
            await client.aclose()
            raise ConnectionFailed(
                f"could not connect to Redis at {redact_url(self.url)}: {e}; check the URL "
                "and that redis-server is running and reachable") from e
        self._redis = client
        await self._check_eviction()
        await self._check_clock()
        return self

    async def _check_eviction(self) -> None:
        try:
            policy = (await self._redis_client.config_get("maxmemory-policy")).get(
                "maxmemory-policy")
        except rex.RedisError:
            return  # CONFIG may be denied by ACLs; not fatal
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and policy != "noeviction":
            log.error("Redis maxmemory-policy is not noeviction: Redis may evict queued "
                      "messages under memory pressure; set maxmemory-policy noeviction",
                      policy=policy)

    async def _check_clock(self) -> None:
        """Warn when this host's clock is more than ``CLOCK_SKEW_WARN_S`` off
        Redis's. Delays are due on Redis's clock, but an ``eta`` datetime becomes
        a delay on the producer's clock and expiry is checked on the worker's."""
        try:
            before = time.time()
            seconds, micros = await self._redis_client.time()
            after = time.time()
        except rex.RedisError:
            return  # TIME may be denied by ACLs; not fatal
        skew = (before + after) / 2 - (seconds + micros / 1e6)
        if abs(skew) > CLOCK_SKEW_WARN_S + (after - before) / 2:
            log.warning("this host's clock is off Redis's clock: delayed tasks are due on "
                        "Redis's clock, but an eta given as a datetime is turned into a delay "
                        "on the producer's clock and expiry is checked on the worker's clock, "
                        "so both are off by the skew; sync the clocks (NTP)",
                        skew_s=round(skew, 1), redis=redact_url(self.url))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        if self._redis is not None:
            client, self._redis = self._redis, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(self._prefix, name)
        return q

    def _consumer_name(self) -> str:
        host = self.options.consumer_name or socket.gethostname()
        return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"

    # -- the protocol ------------------------------------------------------------------

    async def declare(self, queue: str) -> None:
        q = self._queue(queue)
        with mapped(f"declaring queue {queue!r}"):
            try:
                await cmd(self._redis_client, "XGROUP", "CREATE", q.streams[0],
                          self.options.group, "0", "MKSTREAM")
            except rex.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def publish(self, envelope: Envelope) -> None:
        q = self._queue(envelope.queue)
        band = band_of(envelope.priority)
        what = f"publishing message {envelope.id} to queue {envelope.queue!r}"
        if envelope.delay_s > 0:
            call: Call = (PUBLISH, [*q.streams, q.delayed],
                          [0, band, math.ceil(envelope.delay_s * 1000),
                           self._delayed_member(envelope, band)])
            if self.options.min_replicas:
                await self._replicated([call], what)
            else:
                with mapped(what, publish=True):
                    await evalsha(self._redis_client, *call)
            self._wake_delay_timers()
        elif self.options.min_replicas:
            await self._replicated([(PUBLISH, [*q.streams, q.delayed],
                                     [0, band, 0, encode(envelope)])], what)
        else:
            with mapped(what, publish=True):
                await cmd(self._redis_client, "XADD", q.streams[band], "*", "e",
                          encode(envelope))

    @staticmethod
    def _delayed_member(envelope: Envelope, band: int) -> bytes:
        return b"%s|%d0:%s" % (secrets.token_hex(8).encode(), band, encode(envelope))

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """One pipeline of script calls (``publish_chunk`` messages each, one queue
        per call). All or error: when it raises, any subset may be stored."""
        chunk = self.options.publish_chunk
        groups: dict[str, tuple[list[bytes], list[bytes | int]]] = {}
        calls: list[Call] = []

        def flush(name: str, plain: list[bytes], other: list[bytes | int]) -> None:
            q = self._queue(name)
            calls.append((PUBLISH, [*q.streams, q.delayed], [len(plain), *plain, *other]))

        for env in envelopes:
            entry = groups.get(env.queue)
            if entry is None:
                entry = groups[env.queue] = ([], [])
            plain, other = entry
            if env.delay_s > 0:
                band = band_of(env.priority)
                other += (band, math.ceil(env.delay_s * 1000), self._delayed_member(env, band))
            elif env.priority > 0:
                other += (band_of(env.priority), 0, encode(env))
            else:
                plain.append(encode(env))
            if len(plain) + len(other) // 3 >= chunk:
                flush(env.queue, plain, other)
                groups[env.queue] = ([], [])
        for name, (plain, other) in groups.items():
            if plain or other:
                flush(name, plain, other)
        if not calls:
            return
        what = f"publishing {len(envelopes)} messages"
        if self.options.min_replicas:
            await self._replicated(calls, what)
        else:
            with mapped(what, publish=True):
                results = await evalsha_many(self._redis_client, calls)
            for result in results:
                if isinstance(result, Exception):
                    raise as_broker_error(what, result, publish=True)
        if any(env.delay_s > 0 for env in envelopes):
            self._wake_delay_timers()

    async def _replicated(self, calls: Sequence[Call], what: str) -> None:
        """Run publish script calls, then ``WAIT`` for ``min_replicas`` on the same
        connection (a redis-py pipeline holds one): ``WAIT`` covers every write
        the connection made, and a replica that has a later write has the earlier
        ones. Scripts Redis lost (``NOSCRIPT``: nothing ran) are loaded and sent
        again. Raises ``PublishError`` when fewer replicas acknowledged in time."""
        opts = self.options
        todo = list(calls)
        for _ in range(2):
            pipe = self._redis_client.pipeline(transaction=False)
            for script, keys, args in todo:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", opts.min_replicas, opts.replica_timeout_ms)
            with mapped(what, publish=True):
                results = await pipe.execute(raise_on_error=False)
            missing = [c for c, r in zip(todo, results, strict=False)
                       if isinstance(r, rex.NoScriptError)]
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, rex.NoScriptError):
                    raise as_broker_error(what, result, publish=True)
            if not missing:
                break
            with mapped(what, publish=True):
                for script, _, _ in missing:
                    await cmd(self._redis_client, "SCRIPT", "LOAD", script.source)
            todo = missing
        else:
            raise PublishError(f"{what}: Redis kept answering NOSCRIPT for the publish script")
        acked = int(results[-1])
        if acked < opts.min_replicas:
            raise PublishError(
                f"{what}: stored on the primary but acknowledged by {acked} of "
                f"{opts.min_replicas} replicas within {opts.replica_timeout_ms} ms "
                "(min_replicas): it may be lost if Redis fails over now; check the "
                "replicas' links (INFO replication), then retry with the same task id")

    def _wake_delay_timers(self) -> None:
        """Delays published through this broker need not wait for the tick."""
        for consumer in self._consumers:
            consumer._delay_wake.set()

    @asynccontextmanager
    async def consume(
        self, queues: Sequence[str], *, prefetch: int
    ) -> AsyncIterator[RedisConsumer]:
        """A consumer of ``queues`` holding at most ``prefetch`` unsettled deliveries:
        ``async with broker.consume(["q"], prefetch=10) as c``. Leaving the block
        closes it (see :meth:`RedisConsumer.aclose`); an exception raised in the
        block leaves as itself, never inside an exception group (promise 10)."""
        consumer = RedisConsumer(self, queues, prefetch)
        for q in consumer._queues:
            await self.declare(q.name)
        with unwrapped():
            async with anyio.create_task_group() as tg:
                await tg.start(consumer._run)
                self._consumers.add(consumer)
                try:
                    yield consumer
                finally:
                    await consumer.aclose()

    async def _flush_consumers(self) -> None:
        """Read your own writes: send this broker's queued settlements first."""
        for consumer in list(self._consumers):
            await consumer.flush()

    async def stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        await self._flush_consumers()
        with mapped(f"reading the stats of queue {queue!r}"):
            ready, delayed, in_flight, dead = await evalsha(
                self._redis_client, STATS, [*q.streams, q.delayed, q.dead], [self.options.group])
        return QueueStats(ready=ready, delayed=delayed, in_flight=in_flight, dead=dead)

    async def purge(self, queue: str) -> int:
        q = self._queue(queue)
        await self._flush_consumers()
        total = 0
        with mapped(f"purging queue {queue!r}"):
            while True:
                removed, more = await evalsha(
                    self._redis_client, PURGE, [*q.streams, q.delayed], [self.options.group, 1000])
                total += int(removed)
                if not more:
                    return total

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        q = self._queue(queue)
        await self._flush_consumers()
        with mapped(f"reading the dead letters of queue {queue!r}"):
            entries: list[Any] = await cmd(self._redis_client, "XRANGE", q.dead, "-", "+",
                                           "COUNT", limit)
        out: list[DeadLetter] = []
        for entry_id, fields in entries:
            data = fields.get(b"e", b"")
            try:
                envelope = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                envelope = Envelope(id=entry_id.decode(), queue=queue, body=data,
                                    headers={"taskloom-malformed": "true"})
            out.append(DeadLetter(envelope=envelope,
                                  reason=fields.get(b"r", b"").decode(errors="replace"),
                                  delivery_count=int(fields.get(b"c", 0))))
        return out

    # -- helpers (not part of the protocol) -------------------------------------------

    async def purge_namespace(self) -> int:
        """Delete every key under this broker's namespace prefix (SCAN + UNLINK,
        never FLUSH). For tests and teardown; returns how many keys were deleted."""
        r = self._redis_client
        deleted = 0
        with mapped(f"purging namespace {self._prefix!r}"):
            batch: list[bytes] = []
            async for key in r.scan_iter(match=_glob_escape(self._prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await r.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await r.unlink(*batch))
        return deleted

    def __repr__(self) -> str:
        return f"RedisBroker(url={redact_url(self.url)!r}, namespace={self.namespace!r})"
