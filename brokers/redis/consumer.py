"""The consumer of the Redis broker: fetching, leases, delays, closing.

How it keeps the promises of :mod:`brokers.base` (settling: :mod:`.delivery`;
outages: :mod:`.errors`):

* **Fetching** runs a Lua script (``lua/fetch.lua``) that reads
  ``XREADGROUP … >`` from the priority streams, highest first, for at most the
  consumer's free prefetch credits (so the pending list of a consumer never
  exceeds its prefetch). When nothing is left it waits on ``XREAD BLOCK`` (a
  dedicated connection; it consumes nothing) for the next entry, with the
  fetch script queued behind it on that connection: Redis runs the fetch the
  moment the wait ends, so leaving the idle state costs no extra round trip
  (that fetch asks for at most a quarter of the prefetch, never the last
  credit, reserved while it waits); a busy consumer never blocks. Under load a
  fetch waits for a quarter of the prefetch to be free, or ``batch_wait_s``.
* **Leases**: a consumer re-``XCLAIM``\\s (``JUSTID``) its unsettled entries every
  ``lease_s / 3`` seconds, and ``XAUTOCLAIM``\\s entries idle for ``lease_s``
  (those of dead consumers) every ``lease_s / 3``. Past ``max_deliveries`` an
  entry goes to the dead-letter stream with reason ``delivery_limit``.
* **Delays** live in the sorted set; a script moves due messages into the
  streams, scored on the Redis clock (never early). Each consumer sleeps until
  the earliest due time it knows of, at most ``delay_tick_s``: a delayed message
  published by someone else and due earlier is late by at most that tick.
* **Closing** stops fetching, flushes pending settlements, then puts every entry
  still pending for the consumer back at the end of its stream with its
  delivery count (one script per queue), and deletes the consumer.
* **Size**: an entry longer than ``max_message_bytes`` (plus 64 KiB of envelope)
  is dead-lettered inside Redis as ``too_large`` by the fetch script: its bytes
  never reach a worker. A consumer holds at most ``fetch_bytes`` of message
  bytes (at least one message): a fetch reads one entry first, then as many as
  the budget left fits at their average size.
* **Data loss**: when the group of a queue disappears (Redis restarted without
  persistence, keys deleted), the consumer logs an error, recreates the group at
  id 0 (never ``$``) and keeps serving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog

from brokers.base import (
    BrokerConnectionError,
    BrokerError,
    Envelope,
    ReceiveIteration,
    consumed_queues,
)
from brokers.redis.delivery import Batch, RedisDelivery
from brokers.redis.errors import Outage, as_broker_error, backoff, mapped
from brokers.redis.fetching import report, streams_after, wait_command
from brokers.redis.keys import Queue, Stream, decode
from brokers.redis.options import ENVELOPE_HEADROOM, RedisBrokerOptions
from brokers.redis.ready import ReadyQueue
from brokers.redis.scripts import (
    FETCH,
    PENDING,
    PROMOTE,
    RECLAIM,
    RELEASE,
    Call,
    evalsha,
    evalsha_many,
    exchange,
    pack_command,
)

__all__ = ["Host", "RedisConsumer"]

log = structlog.get_logger("brokers.redis")


class Host(Protocol):
    """What a consumer needs of its broker (:class:`~brokers.redis.broker.RedisBroker`)."""

    options: RedisBrokerOptions
    _consumers: set[RedisConsumer]

    @property
    def _redis_client(self) -> aioredis.Redis: ...

    def _client(self, **overrides: Any) -> aioredis.Redis: ...

    def _queue(self, name: str) -> Queue: ...

    def _consumer_name(self) -> str: ...


class RedisConsumer(ReceiveIteration):
    """A consumer of the Redis broker; see :meth:`RedisBroker.consume`."""

    def __init__(self, broker: Host, queues: Sequence[str], prefetch: int) -> None:
        self._broker = broker
        self._opts = broker.options
        self._queues = [broker._queue(name) for name in consumed_queues(queues, prefetch)]
        self._prefetch = prefetch
        self._low_water = max(1, prefetch // 4)
        self.name = broker._consumer_name()
        self._credit = anyio.Event()
        self._ready: ReadyQueue[RedisDelivery] = ReadyQueue(self._credit_freed)
        self._unsettled: set[RedisDelivery] = set()
        self._reserved = 0  # credits of fetches in progress
        self._last_fetch = self._last_flush = -math.inf  # when the last round trip began
        self._closed = False
        self._closed_event = anyio.Event()
        self._started = False
        self._batch = Batch()
        self._flush_wake = anyio.Event()
        self._flush_lock = anyio.Lock()
        self._delay_wake = anyio.Event()
        self._intake_scope = anyio.CancelScope()
        self._intake_stopped = anyio.Event()
        self._scope = anyio.CancelScope()
        self._rotation = 0
        # (keys, key index -> stream) for each rotation of the queue order (fairness)
        self._layouts: list[tuple[list[str], list[Stream | None]]] = []
        for r in range(len(self._queues)):
            keys: list[str] = []
            slots: list[Stream | None] = []
            for q in self._queues[r:] + self._queues[:r]:
                keys += [*q.streams, q.dead]
                slots += [*q.bands, None]
            self._layouts.append((keys, slots))
        self._blocking: aioredis.Redis | None = None
        self._outage = Outage(self.name)
        self._held_bytes = 0  # message bytes of unsettled deliveries (see fetch_bytes)
        self._reread_pel = False  # after an outage: look for entries we never heard of

    # -- the receive stream ------------------------------------------------------------

    async def receive(self) -> RedisDelivery:
        return await self._ready.get()

    def _credit_freed(self) -> None:
        self._credit.set()

    async def aclose(self) -> None:
        """Stop fetching, flush settlements, hand unsettled deliveries back."""
        if self._closed:
            with anyio.CancelScope(shield=True):
                await self._closed_event.wait()
            return
        self._closed = True
        self._ready.close()
        with anyio.CancelScope(shield=True):
            self._intake_scope.cancel()
            if self._started:
                await self._intake_stopped.wait()
            # from here on, settling what is still unsettled is a no-op; what was
            # settled before is flushed before the rest is handed back
            held = len(self._unsettled)
            for delivery in self._unsettled:
                delivery._settled = "released"
            self._unsettled.clear()
            self._held_bytes = 0
            self._ready.clear()
            await self.flush()
            try:
                with mapped("releasing unsettled deliveries"):
                    released = 0
                    for q in self._queues:
                        released += int(await evalsha(
                            self._broker._redis_client, RELEASE, [*q.streams, q.dead],
                            [self._opts.group, self.name]))
                if released:
                    log.info("handed unsettled deliveries back", consumer=self.name,
                             released=released)
            except BrokerError as e:
                log.warning("could not hand unsettled deliveries back; other consumers "
                            "will reclaim them once their lease expires", consumer=self.name,
                            held=held, lease_s=self._opts.lease_s, error=str(e))
            self._scope.cancel()
            self._broker._consumers.discard(self)
            if self._blocking is not None:
                await self._blocking.aclose()
            self._closed_event.set()

    # -- background --------------------------------------------------------------------

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        opts = self._opts
        self._blocking = self._broker._client(socket_timeout=opts.block_s + 5.0)
        with self._scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._flush_loop)
                tg.start_soon(self._intake)
                self._started = True
                task_status.started()

    async def _intake(self) -> None:
        try:
            with self._intake_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._fetch_loop)
                    tg.start_soon(self._lease_loop)
                    tg.start_soon(self._delay_loop)
        finally:
            self._intake_stopped.set()

    def _want(self) -> tuple[int, float]:
        """How many to fetch now (0: not now), and until when to wait otherwise."""
        free = self._prefetch - len(self._unsettled) - self._reserved
        if self._held_bytes >= self._opts.fetch_bytes and self._unsettled:
            return 0, math.inf  # holding its byte budget: wait for settlements
        if free >= self._low_water:
            return free, math.inf
        if free <= 0 or self._ready:
            return 0, math.inf
        due = self._last_fetch + self._opts.batch_wait_s
        if anyio.current_time() >= due:
            return free, math.inf
        return 0, due  # busy: let credits accumulate for a moment

    async def _fetch_loop(self) -> None:
        while True:
            want, until = self._want()
            if want == 0:
                self._credit = anyio.Event()
                with anyio.move_on_after(until - anyio.current_time()):
                    await self._credit.wait()
                continue
            try:
                self._reserved += want
                try:
                    with anyio.CancelScope(shield=True):
                        async with self._flush_lock:
                            if self._reread_pel:
                                await self._recover_pending()
                            streams = await self._fetch(want)
                finally:
                    self._reserved -= want
                if self._outage.up():
                    await self._drop_stale_connections()
                while streams:
                    streams = await self._wait(streams)
            except BrokerConnectionError as e:
                self._reread_pel = True
                await anyio.sleep(self._outage.down(e))
            except BrokerError as e:
                log.warning("fetching from Redis failed; retrying", consumer=self.name,
                            error=str(e))
                await anyio.sleep(backoff(4))

    async def _drop_stale_connections(self) -> None:
        """After an outage: close the idle pooled connections. The outage broke
        them, and a client finds out only by failing on one (uvloop: a write on
        a closed transport), which would look like a new outage."""
        with anyio.CancelScope(shield=True):
            await self._broker._redis_client.connection_pool.disconnect(
                inuse_connections=False)
            if self._blocking is not None:
                await self._blocking.connection_pool.disconnect()

    async def _recover_pending(self) -> None:
        """After an outage: take up the entries pending for this consumer that it
        does not know of (a fetch whose reply the outage swallowed), instead of
        leaving them to a reclaim after ``lease_s``. Call with the flush lock held."""
        known = {d._id for d in self._unsettled} | self._batch.ids()
        found = 0
        for q in self._queues:
            with mapped("re-reading this consumer's pending entries"):
                out = await evalsha(self._broker._redis_client, PENDING, q.streams,
                                    [self._opts.group, self.name, self._prefetch])
            mine = []
            for i in range(0, len(out), 4):
                if out[i + 1] not in known:
                    mine += out[i:i + 4]
            if mine:
                found += len(mine) // 4
                self._accept(mine, q.bands)
        self._reread_pel = False
        if found:
            log.info("took up deliveries whose fetch reply was lost in the outage",
                     consumer=self.name, count=found)

    async def _wait(self, streams: dict[Any, Any]) -> dict[Any, Any]:
        """Nothing was left to fetch: wait on ``XREAD BLOCK`` for the next entry
        of ``streams``, with the fetch script queued behind it on the same
        connection, so Redis runs the fetch as soon as the wait ends (no round
        trip between wake-up and fetch: ``run()``'s latency). Its credits are
        reserved meanwhile: at most a quarter of the prefetch, never the last
        one (a reclaim while idle always has room). With one credit, or at the
        byte budget, the wait is a plain ``XREAD BLOCK`` and the loop fetches after.
        Returns what :meth:`_fetch` does (streams to wait on again: nothing left)."""
        free = self._prefetch - len(self._unsettled) - self._reserved
        want = min(self._low_water, free - 1)
        if want < 1 or self._held_bytes >= self._opts.fetch_bytes:
            await self._wait_only(streams)
            return {}
        call, slots = self._fetch_call(want)
        script, keys, args = call
        commands = [wait_command(streams, self._opts.block_s),
                    pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))]
        self._reserved += want
        try:
            with mapped("waiting for messages"):
                assert self._blocking is not None
                woke, fetched = await exchange(self._blocking, commands, 2)
                if isinstance(woke, Exception):
                    raise woke
            if isinstance(fetched, rex.NoScriptError):
                return {}  # Redis lost its scripts: the loop's next fetch loads it again
            return self._take_fetched(fetched, call, slots)
        finally:
            self._reserved -= want

    async def _wait_only(self, streams: dict[Any, Any]) -> None:
        with mapped("waiting for messages"):
            assert self._blocking is not None
            woke = await exchange(self._blocking, [wait_command(streams, self._opts.block_s)], 1)
            if isinstance(woke[0], Exception):
                raise woke[0]

    def _fetch_call(self, want: int) -> tuple[Call, Sequence[Stream | None]]:
        """The fetch script's call for ``want`` deliveries (the queues rotated:
        fairness), and its key index -> stream."""
        keys, slots = self._layouts[self._rotation]
        self._rotation = (self._rotation + 1) % len(self._layouts)
        opts = self._opts
        self._last_fetch = anyio.current_time()
        budget = max(1, opts.fetch_bytes - self._held_bytes)
        return (FETCH, keys, [opts.group, self.name, want, opts.max_deliveries,
                              opts.max_message_bytes + ENVELOPE_HEADROOM, budget]), slots

    async def _fetch(self, want: int) -> dict[Any, Any]:
        """Flush pending settlements and fetch up to ``want`` deliveries, in one
        round trip (settlements first: a requeued message competes for the fetch).
        When fewer were found, returns the priority streams with their last ids,
        for ``XREAD BLOCK`` to wait on."""
        call, slots = self._fetch_call(want)
        batch = self._take_batch()
        calls = batch.calls(self._opts.group) if batch is not None else []
        calls.append(call)
        try:
            with mapped("fetching messages"):
                results = await evalsha_many(self._broker._redis_client, calls)
        except BrokerError as e:
            if batch is not None:
                self._settled(batch, e, [])
            raise
        if batch is not None:
            self._settled(batch, None, results[:-1])
        return self._take_fetched(results[-1], call, slots)

    def _take_fetched(self, fetched: Any, call: Call, slots: Sequence[Stream | None]
                      ) -> dict[Any, Any]:
        """Take what the fetch script found; the priority streams with their last
        ids when it found fewer than asked (else empty)."""
        if isinstance(fetched, Exception):
            raise as_broker_error("fetching messages", fetched)
        out, lost, dead, last = fetched
        if out:
            self._accept(out, slots)
        report(lost, dead, slots, self._opts)
        if not last:
            return {}
        return streams_after(call[1], last, len(self._queues))

    def _accept(self, out: list[Any], slots: Sequence[Stream | None]) -> None:
        ready, unsettled = self._ready, self._unsettled
        for i in range(0, len(out), 4):
            stream = slots[out[i] - 1]
            assert stream is not None
            entry_id, data, count = out[i + 1], out[i + 2], out[i + 3]
            try:
                envelope = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("dead-lettering a stream entry that is not a taskloom envelope",
                          queue=stream.queue.name, entry=entry_id.decode())
                bad = RedisDelivery(self, stream, entry_id, Envelope(
                    id=entry_id.decode(), queue=stream.queue.name, body=data), count)
                bad._settled = "dead_letter"
                self._submit(bad, "d", "malformed_entry")
                continue
            delivery = RedisDelivery(self, stream, entry_id, envelope, count, len(data))
            self._held_bytes += len(data)
            unsettled.add(delivery)
            ready.append(delivery)
        ready.announce()

    async def _lease_loop(self) -> None:
        period = self._opts.lease_s / 3
        while True:
            try:
                await self._heartbeat()
                with anyio.CancelScope(shield=True):
                    await self._reclaim()
            except BrokerConnectionError as e:
                self._reread_pel = True
                await anyio.sleep(min(period, self._outage.down(e)))
                continue
            except BrokerError as e:
                log.warning("lease upkeep failed; retrying", consumer=self.name, error=str(e))
            await anyio.sleep(period)

    async def _heartbeat(self) -> None:
        """Re-claim our unsettled entries so that nobody reclaims them."""
        by_stream: dict[Stream, list[Any]] = {}
        for delivery in self._unsettled:
            by_stream.setdefault(delivery._stream, []).append(delivery._id)
        if not by_stream:
            return
        group = self._opts.group
        with mapped("renewing leases"):
            pipe = self._broker._redis_client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                for i in range(0, len(ids), 1000):
                    pipe.xclaim(stream.key, group, self.name, 0, ids[i:i + 1000], justid=True)
            results = await pipe.execute(raise_on_error=False)
        kept = sum(len(r) for r in results if isinstance(r, list))
        held = sum(len(ids) for ids in by_stream.values())
        if kept < held:
            log.warning("lost the lease of some deliveries (settled or reclaimed elsewhere, "
                        "or Redis lost them); they may run twice", consumer=self.name,
                        lost=held - kept)

    async def _reclaim(self) -> None:
        """XAUTOCLAIM entries idle longer than the lease (their consumer died)."""
        opts = self._opts
        lease_ms = int(opts.lease_s * 1000)
        stale_ms = max(lease_ms * 10, 60_000)
        for q in self._queues:
            want = self._prefetch - len(self._unsettled) - self._reserved
            if want <= 0:
                return
            with mapped("reclaiming stale deliveries"):
                out, deleted, dead = await evalsha(
                    self._broker._redis_client, RECLAIM, [*q.streams, q.dead],
                    [opts.group, self.name, lease_ms, want, opts.max_deliveries, stale_ms])
            if out:
                log.warning("reclaimed deliveries of a consumer that stopped renewing its "
                            "lease", consumer=self.name, queue=q.name, count=len(out) // 4)
                self._accept(out, q.bands)
            if deleted:
                log.error("DATA LOSS: pending entries whose messages were deleted from the "
                          "stream (trimmed or XDEL'd while unacked)", queue=q.name,
                          entries=[e.decode() for e in deleted[1::2]])
            if dead:
                log.warning("dead-lettered reclaimed messages past max_deliveries",
                            queue=q.name, count=len(dead), max_deliveries=opts.max_deliveries)

    async def _delay_loop(self) -> None:
        tick = self._opts.delay_tick_s
        while True:
            self._delay_wake = anyio.Event()
            wait = tick
            try:
                for q in self._queues:
                    while True:
                        with mapped("moving due delayed messages"):
                            moved, due_ms, bad = await evalsha(
                                self._broker._redis_client, PROMOTE, [q.delayed, *q.streams],
                                [1000])
                        if bad:
                            log.error("dropped malformed delayed-set members", queue=q.name,
                                      count=bad)
                        if moved < 1000:
                            break
                    if due_ms >= 0:
                        wait = min(wait, due_ms / 1000 + 0.001)
            except BrokerConnectionError as e:
                wait = max(wait, self._outage.down(e))
            except BrokerError as e:
                log.warning("moving delayed messages failed; retrying", error=str(e))
            with anyio.move_on_after(max(wait, 0.001)):
                await self._delay_wake.wait()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            batch = self._batch
            wait = self._last_flush + self._opts.batch_wait_s - anyio.current_time()
            if wait > 0:
                # busy: let more settlements (or the next fetch) join this batch
                with anyio.move_on_after(wait):
                    await batch.full.wait()
            else:
                await anyio.lowlevel.checkpoint()  # let tasks ready to settle join
            async with self._flush_lock:
                lost = await self._flush()
            if lost is not None:
                # Redis is unreachable: the settlements were put back; try again later
                await anyio.sleep(self._outage.down(lost))
                self._flush_wake.set()

    # -- settling ----------------------------------------------------------------------

    def _submit(self, delivery: RedisDelivery, verb: str, arg: str) -> None:
        if delivery in self._unsettled:
            self._unsettled.remove(delivery)
            self._held_bytes -= delivery._size
        self._credit.set()
        batch = self._batch
        batch.size += 1
        if batch.size == self._low_water:
            batch.full.set()
        stream = delivery._stream
        ops = batch.ops.get(stream.queue)
        if ops is None:
            ops = batch.ops[stream.queue] = ([], [])
        if verb == "a":
            ops[0].append(stream.digit + delivery._id)
        else:
            ops[1].extend((verb, stream.band, delivery._id, delivery.delivery_count, arg))
            if verb == "n" and arg != "0":
                batch.delays = True
        self._flush_wake.set()

    def _take_batch(self) -> Batch | None:
        batch = self._batch
        if not batch.ops:
            return None
        self._batch = Batch()
        self._last_flush = anyio.current_time()
        return batch

    async def flush(self) -> None:
        """Send pending settlements now (``aclose`` and the broker's ``stats``,
        ``purge`` and ``dead_letters`` do it first)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> BrokerConnectionError | None:
        """Send pending settlements (call with the flush lock held); the error when
        Redis was unreachable (they were put back for the next try)."""
        batch = self._take_batch()
        if batch is None:
            return None
        try:
            with anyio.CancelScope(shield=True), mapped("settling deliveries"):
                results = await evalsha_many(self._broker._redis_client,
                                             batch.calls(self._opts.group))
        except BrokerError as e:
            self._settled(batch, e, [])
            if isinstance(e, BrokerConnectionError) and not self._closed:
                return e
            return None
        self._settled(batch, None, results)
        return None

    def _settled(self, batch: Batch, error: BrokerError | None, results: list[Any]) -> None:
        if isinstance(error, BrokerConnectionError) and not self._closed:
            # The settle script is idempotent (each settlement is gated by its XACK):
            # send these again with the next batch once Redis is back.
            self._batch.merge(batch)
            return
        for result in results:
            if isinstance(result, Exception):
                error = as_broker_error("settling deliveries", result)
        if error is not None:
            log.warning("could not settle deliveries; they will be redelivered",
                        consumer=self.name, count=batch.size, error=str(error))
        else:
            missing = sum(r[1] for r in results)
            lost = sum(r[2] for r in results)
            if missing and batch.retried:
                log.info("settlements sent again after a lost connection had been applied "
                         "already", consumer=self.name, count=missing)
            elif missing:
                log.warning("settled deliveries that were no longer pending: settled by "
                            "another consumer after a reclaim (they ran twice), or lost by "
                            "Redis", consumer=self.name, count=missing)
            if lost:
                log.error("DATA LOSS: settled deliveries whose consumer group is gone "
                          "(Redis restarted without persistence?)", count=lost)
        if batch.delays:
            self._delay_wake.set()

    async def _extend(self, delivery: RedisDelivery) -> None:
        with mapped("renewing a lease"):
            kept = await self._broker._redis_client.xclaim(
                delivery._stream.key, self._opts.group, self.name, 0, [delivery._id],
                justid=True)
        if not kept:
            log.warning("lost the lease of a delivery (reclaimed or settled elsewhere)",
                        message_id=delivery.envelope.id)
