"""The RabbitMQ broker (AMQP 0-9-1 through aio-pika): connection, publishing, inspection.

* **Publishing**: persistent messages on a confirm channel with ``mandatory``, so an
  unroutable message raises :class:`~brokers.base.PublishError` instead of
  vanishing. ``publish_many`` writes a chunk of messages at once (a few socket
  writes, not one per message: :func:`~brokers.amqp._aiormq.send_batch`) and then
  awaits all their confirms together. The queue (and its dead-letter queue) is
  declared on first use and remembered (:mod:`brokers.amqp.topology`); a publish
  that fails makes the broker declare again on next use.
* **Dead letters**: on quorum queues RabbitMQ dead-letters a message delivered
  more than ``delivery_limit`` times by itself (at-least-once), with reason
  ``delivery_limit``. ``dead_letters()`` and ``dead_letter_entries()`` read
  without removing and ``remove_dead_letters()`` removes chosen ones, leaving
  the others in order: see :mod:`brokers.amqp.deadletters` (a lock per
  dead-letter queue, ``basic.get`` then ack or hand back).

Limits: ``stats().delayed`` scans the delay levels of the queue (a message moving
down a level during the scan may be counted twice or missed). On quorum queues
the counts lag a little (Raft applies them). Classic queues cannot count
redeliveries after a crash beyond "redelivered": use ``queue_type=quorum`` to
dead-letter messages that crash their worker repeatedly. Quorum queues have no
priorities on RabbitMQ 3.x (``capabilities.max_priority`` is 0 there). RabbitMQ
3.x has no default delivery limit on quorum queues and 4.x a default of 20: this
broker always sets ``x-delivery-limit`` explicitly. RabbitMQ < 3.12 only knows
the global ``consumer_timeout`` (rabbitmq.conf); ``consumer_timeout_s`` must
match it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import aiormq.abc
import aiormq.exceptions as aex
import anyio
import structlog
from aio_pika.abc import AbstractRobustChannel
from pamqp.commands import Basic
from yarl import URL

from brokers.amqp import deadletters
from brokers.amqp._aiormq import Item, can_batch, send_batch
from brokers.amqp.consumer import CLOSE_TIMEOUT_S, AmqpConsumer, Consuming
from brokers.amqp.errors import mapped
from brokers.amqp.headers import H_DEAD_AT, H_DELIVERED, H_REASON
from brokers.amqp.options import (
    DEFAULT_DELIVERY_LIMIT,
    AmqpBrokerOptions,
    check_url,
    connect_url,
    is_loopback,
    parse_url,
)
from brokers.amqp.topology import DELAY_LEVELS, Queue, Topology
from brokers.base import (
    BrokerError,
    Capabilities,
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    DeadLetter,
    Envelope,
    PublishError,
    QueueStats,
    redact_url,
)

__all__ = ["AmqpBroker"]

log = structlog.get_logger("brokers.amqp")


class _Scratch:
    """Raw channels for passive declares, purges and reads, which RabbitMQ answers with
    a channel close when the queue does not exist: a new channel is opened then."""

    def __init__(self, broker: AmqpBroker) -> None:
        self._broker = broker
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def channel(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._broker._raw_channel()
        return self._channel

    async def count(self, queue: str) -> int | None:
        """Ready messages of ``queue``; None when it does not exist."""
        channel = await self.channel()
        try:
            ok = await channel.queue_declare(queue, passive=True)
        except aex.ChannelNotFoundEntity:
            return None
        return ok.message_count or 0

    async def purge(self, queue: str) -> int | None:
        channel = await self.channel()
        try:
            ok = await channel.queue_purge(queue)
        except aex.ChannelNotFoundEntity:
            return None
        return ok.message_count or 0

    async def aclose(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            try:
                await self._channel.close()
            except Exception as e:
                log.debug("amqp.scratch_close_failed", error=repr(e))


class AmqpBroker:
    """RabbitMQ broker. ``AmqpBroker.from_url("amqp://user:pass@host:5672/vhost")``."""

    def __init__(self, url: str = "amqp://guest:guest@localhost:5672/", *,
                 namespace: str = "", options: AmqpBrokerOptions | None = None) -> None:
        self.options = options = options or AmqpBrokerOptions()
        #: The vhost (URL path): one swarm of workers and producers shares one vhost.
        self.vhost = check_url(url, namespace, options)
        self.url = url
        self.namespace = namespace
        self._quorum = options.queue_type == "quorum"
        #: ``x-delivery-limit`` of quorum queues (None for classic queues).
        self.delivery_limit = ((options.delivery_limit or DEFAULT_DELIVERY_LIMIT)
                               if self._quorum else None)
        self.capabilities = Capabilities(
            max_priority=0 if self._quorum else options.max_priority,
            native_delay=True,
            max_message_bytes=options.max_message_bytes,
            dead_letter=True,
            lease_s=None,
            consumer_timeout_s=options.consumer_timeout_s,
        )
        self._topology = Topology(
            f"{namespace}." if namespace else "", quorum=self._quorum,
            delivery_limit=self.delivery_limit, max_priority=options.max_priority,
            raw_channel=self._raw_channel)
        self._in_flight: dict[str, int] = {}
        self._consumers: set[AmqpConsumer] = set()
        self._conn: aio_pika.RobustConnection | None = None
        self._pub: AbstractRobustChannel | None = None

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "") -> AmqpBroker:
        """``amqp://`` or ``amqps://`` URL. Its path is the vhost (``/`` when empty);
        query parameters named like :class:`AmqpBrokerOptions` fields configure the
        broker; TLS files (``cafile``, ``capath``, ``cadata``, ``certfile``,
        ``keyfile``) and the connection ``name`` go to aio-pika."""
        url, options = parse_url(url)
        return cls(url, namespace=namespace, options=options)

    # -- connection --------------------------------------------------------------------

    @property
    def _connection(self) -> aio_pika.RobustConnection:
        if self._conn is None:
            raise BrokerError("the AMQP broker is not connected: use `async with broker:`")
        return self._conn

    @property
    def _publisher(self) -> AbstractRobustChannel:
        if self._pub is None:
            raise BrokerError("the AMQP broker is not connected: use `async with broker:`")
        return self._pub

    async def __aenter__(self) -> Self:
        if self._conn is not None:
            return self
        name = f"taskloom {self.namespace or '-'} pid={os.getpid()}"
        conn = aio_pika.RobustConnection(
            URL(connect_url(self.url, self.options)), client_properties={"connection_name": name})
        try:
            await conn.connect(timeout=self.options.connect_timeout_s)
            pub = conn.channel(publisher_confirms=True, on_return_raises=True)
            await pub.initialize()
        except Exception as e:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise ConnectionFailed(
                f"could not connect to RabbitMQ at {redact_url(self.url)} (vhost "
                f"{self.vhost!r}): {type(e).__name__}: {e}; {self._connect_hint(e)}") from e
        self._conn = conn
        self._pub = pub
        return self

    def _connect_hint(self, error: BaseException) -> str:
        """What to check after a failed connect: RabbitMQ never says why it refused
        a login, but a refused ``guest`` through a non-loopback address is always
        its ``loopback_users`` default (RELIABILITY S2)."""
        parts = urlsplit(self.url)
        if (isinstance(error, aex.ProbableAuthenticationError)
                and unquote(parts.username or "guest") == "guest"
                and not is_loopback(parts.hostname or "localhost")):
            return ("RabbitMQ lets the default 'guest' user log in only through a loopback "
                    "address (its loopback_users setting): create a user for this "
                    "application and put it in the URL")
        return ("check that the server runs and is reachable, the user and password, and "
                "that the vhost exists and the user has permissions on it")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        if conn is None:
            return
        with anyio.CancelScope(shield=True):
            for consumer in list(self._consumers):
                await consumer.aclose()
            self._conn = self._pub = self._topology.channel = None
            try:
                await conn.close()
            except Exception as e:
                log.debug("amqp.close_failed", error=repr(e))

    async def _reconnect(self, connection: aiormq.abc.AbstractConnection, why: str, *,
                         queues: list[str]) -> None:
        """Close ``connection`` (if it is still the current one) so that the robust
        connection reconnects and every consumer subscribes again. One log line."""
        conn = self._conn
        transport = conn.transport if conn is not None else None
        if transport is None or transport.connection is not connection or connection.is_closed:
            return  # another consumer's watchdog (or aio-pika) did it already
        log.warning("amqp.consumer_stalled", queues=queues, why=why,
                    action="reconnecting; unsettled deliveries are redelivered (duplicates "
                           "possible)")
        lost = ConnectionLost(f"taskloom's consumer watchdog closed the connection: {why}")
        with anyio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                # aiormq sends Connection.Close and waits at most a few seconds for
                # the answer, then drops the socket; aio-pika then reconnects.
                await connection.close(lost)
            except Exception as e:
                log.debug("amqp.close_failed", error=repr(e))

    async def _raw_channel(self) -> aiormq.abc.AbstractChannel:
        """A plain aiormq channel on the current connection (waits for a reconnect)."""
        conn = self._connection
        with mapped("opening a channel"), anyio.fail_after(self.options.publish_timeout_s):
            while True:
                await conn.ready()
                transport = conn.transport
                if transport is not None and not transport.connection.is_closed:
                    return await transport.connection.channel(publisher_confirms=False)
                await anyio.sleep(0.05)  # between two connection attempts

    # -- topology ----------------------------------------------------------------------

    def _queue(self, name: str) -> Queue:
        return self._topology.queue(name)

    async def _declare(self, q: Queue) -> None:
        await self._topology.declare(q)

    async def declare(self, queue: str) -> None:
        """Create the queue and its dead-letter queue (delay levels come on first use);
        idempotent."""
        await self._declare(self._queue(queue))

    # -- publishing --------------------------------------------------------------------

    def _properties(self, envelope: Envelope, delivered: int = 0,
                    reason: str | None = None) -> Basic.Properties:
        headers: dict[str, Any] | None = None
        if envelope.headers or delivered or reason is not None:
            headers = dict(envelope.headers)
            if delivered:
                headers[H_DELIVERED] = delivered
            if reason is not None:
                headers[H_REASON] = reason
                headers[H_DEAD_AT] = int(time.time() * 1000)
        priority = None
        if envelope.priority > 0 and self.capabilities.max_priority:
            priority = min(envelope.priority, self.capabilities.max_priority)
        return Basic.Properties(delivery_mode=2, message_id=envelope.id or None,
                                priority=priority, headers=headers)

    async def _item(self, envelope: Envelope, delivered: int = 0) -> Item:
        """Declare what ``envelope`` needs; its exchange, routing key, body, properties."""
        topology = self._topology
        q = topology.queues.get(envelope.queue) or topology.queue(envelope.queue)
        if not q.declared:
            await topology.declare(q)
        properties = self._properties(envelope, delivered)
        exchange, key = await topology.route(q, envelope.delay_s)
        return exchange, key, envelope.body, properties

    async def _publisher_channel(self) -> aiormq.Channel:
        """The publisher's live underlay channel (after a reconnect, once restored)."""
        publisher = self._publisher
        while True:
            await publisher.ready()
            channel = cast(aiormq.Channel, await publisher.get_underlay_channel())
            if not channel.is_closed:
                return channel
            await anyio.sleep(0.01)  # closed, and its close callback has not run yet

    async def _publish(self, items: Sequence[Item] | Callable[[], Awaitable[list[Item]]],
                       what: str) -> None:
        """Send ``items`` and await all their confirms. ``items`` may be a coroutine
        function that declares what they need and builds them: the declares then
        run inside the same deadline (a blocked connection answers no declare)."""
        try:
            with mapped(what, publish=True), anyio.fail_after(self.options.publish_timeout_s):
                if callable(items):
                    items = await items()
                ch = await self._publisher_channel()
                if len(items) == 1:
                    exchange, key, body, props = items[0]
                    await ch.basic_publish(body, exchange=exchange, routing_key=key,
                                           properties=props, mandatory=True, wait=False)
                    return
                if can_batch(ch):
                    confirms = await send_batch(ch, items)
                    results = await asyncio.gather(*confirms, return_exceptions=True)
                else:  # pragma: no cover  # an aiormq without the attributes used
                    results = await asyncio.gather(
                        *(ch.basic_publish(body, exchange=exchange, routing_key=key,
                                           properties=props, mandatory=True, wait=False)
                          for exchange, key, body, props in items),
                        return_exceptions=True)
                for result in results:
                    if isinstance(result, asyncio.CancelledError):
                        raise ConnectionLost(f"{what}: the channel closed before RabbitMQ "
                                             "confirmed; the messages may or may not be stored")
                    if isinstance(result, BaseException):
                        raise result
        except PublishError as e:
            # A queue or exchange deleted behind our back: declare it again next
            # time (not after a timeout: nothing says the topology changed).
            if isinstance(e.__cause__, aex.PublishError | aex.ChannelNotFoundEntity):
                self._topology.forget_all()
            raise

    async def publish(self, envelope: Envelope) -> None:
        """Store one message durably; returns once RabbitMQ confirmed it. Raises
        :class:`~brokers.base.PublishError` when it is unroutable or refused."""
        async def items() -> list[Item]:
            return [await self._item(envelope)]

        await self._publish(items, f"publish to {envelope.queue!r}")

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Store many messages: each chunk is sent at once, then its confirms awaited
        together. All-or-error; on error any subset may be stored."""
        chunk = self.options.publish_chunk
        what = f"publish_many ({len(envelopes)} messages)"
        for i in range(0, len(envelopes), chunk):
            part = envelopes[i:i + chunk]

            async def items(part: Sequence[Envelope] = part) -> list[Item]:
                return [await self._item(e) for e in part]

            await self._publish(items, what)

    async def _send(self, envelope: Envelope, delivered: int) -> None:
        """Publish ``envelope`` again (a nack), with the deliveries it had."""
        async def items() -> list[Item]:
            return [await self._item(envelope, delivered)]

        await self._publish(items, f"nack of {envelope.id!r} in {envelope.queue!r}")

    async def _send_dead_letter(self, envelope: Envelope, reason: str, delivered: int) -> None:
        async def items() -> list[Item]:
            q = self._queue(envelope.queue)
            await self._declare(q)
            props = self._properties(envelope, delivered, reason)
            return [(self._topology.dlx, q.amqp, envelope.body, props)]

        await self._publish(items, f"dead-lettering {envelope.id!r} of {envelope.queue!r}")

    # -- consuming ---------------------------------------------------------------------

    def consume(self, queues: Sequence[str], *, prefetch: int) -> Consuming:
        """A consumer of ``queues`` on its own channel, holding at most ``prefetch``
        unsettled deliveries: ``async with broker.consume(["q"], prefetch=10) as c``.
        Leaving the block closes it (see :meth:`AmqpConsumer.aclose`), even when
        cancelled; an error raised in the block comes out as it is."""
        return Consuming(AmqpConsumer(self, queues, prefetch))

    # -- inspection --------------------------------------------------------------------

    async def stats(self, queue: str) -> QueueStats:
        """``ready`` and ``dead`` from RabbitMQ; ``delayed`` summed over the queue's
        delay levels; ``in_flight`` held by this process's consumers only."""
        q = self._queue(queue)
        in_flight = max(self._in_flight.get(queue, 0), 0)
        scratch = _Scratch(self)
        try:
            with mapped(f"stats of {queue!r}"):
                ready = await scratch.count(q.amqp)
                if ready is None:
                    return QueueStats(in_flight=in_flight)
                dead = await scratch.count(q.dlq) or 0
                delayed = 0
                for k in range(DELAY_LEVELS):
                    n = await scratch.count(q.level(k))
                    if n is None:
                        break
                    delayed += n
        finally:
            await scratch.aclose()
        return QueueStats(ready=ready, delayed=delayed, in_flight=in_flight, dead=dead)

    async def purge(self, queue: str) -> int:
        """Drop every ready and delayed message of ``queue``; returns how many.
        Unsettled deliveries and dead letters stay."""
        q = self._queue(queue)
        scratch = _Scratch(self)
        try:
            with mapped(f"purging {queue!r}"):
                total = await scratch.purge(q.amqp)
                if total is None:
                    return 0
                for k in range(DELAY_LEVELS):
                    n = await scratch.purge(q.level(k))
                    if n is None:
                        break
                    total += n
        finally:
            await scratch.aclose()
        return total

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead letters of ``queue``, left in place and in order (see
        :mod:`brokers.amqp.deadletters`)."""
        return [e.letter for e in await deadletters.read(self, self._queue(queue), limit)]

    async def dead_letter_entries(self, queue: str) -> list[deadletters.DeadLetterEntry]:
        """Every dead letter of ``queue``, oldest first, each with the key that
        removes it and when it was dead-lettered; left in place and in order."""
        return await deadletters.read(self, self._queue(queue), None)

    async def remove_dead_letters(self, queue: str, keys: Sequence[str]) -> int:
        """Remove the dead letters of ``queue`` with these keys (from
        :meth:`dead_letter_entries`); the others stay, in order. Returns how many
        were removed (idempotent: a key already removed counts nothing)."""
        return await deadletters.remove(self, self._queue(queue), keys)

    async def purge_namespace(self) -> int:
        """Test helper: delete the queues and exchanges this broker declared under its
        namespace (with their dead-letter and delay queues). Returns how many."""
        if not self.namespace:
            raise ConfigError("purge_namespace() needs a namespace: without one it would "
                             "delete queues shared with other applications")
        with mapped("purging the namespace"):
            ch = await self._raw_channel()
            try:
                deleted = await self._topology.delete_all(ch)
            finally:
                await ch.close()
        self._topology.forget_created()
        return deleted

    def __repr__(self) -> str:
        return (f"AmqpBroker({redact_url(self.url)!r}, namespace={self.namespace!r}, "
                f"queue_type={self.options.queue_type!r})")
