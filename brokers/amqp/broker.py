"""The RabbitMQ broker (AMQP 0-9-1 through aio-pika): confirms, late ack, TTL-cascade delays.

Layout in the URL's vhost, every name under the namespace prefix ``<ns>.`` (none
when the namespace is empty)::

    <ns>.<queue>               the queue: durable, classic (x-max-priority) or quorum
                               (x-delivery-limit, at-least-once dead-lettering)
    <ns>.<queue>.dlq           its dead letters (classic, durable), bound to the DLX
    <ns>.taskloom.dlx          direct exchange: routing key <ns>.<queue> -> <queue>.dlq
    <ns>.<queue>.delay.NN      delay level NN: messages wait 2**NN ticks (TTL), then are
                               dead-lettered to the level below
    <ns>.taskloom.delay.NN     topic exchange of level NN
    <ns>.taskloom.delay        topic exchange that hands delayed messages back to queues

How the promises are kept:

* **Publishing**: persistent messages on a confirm channel with ``mandatory``, so an
  unroutable message raises :class:`~brokers.base.PublishError` instead of
  vanishing. ``publish_many`` writes a chunk of messages at once (a few socket
  writes, not one per message) and then awaits all their confirms together. The
  queue (and its dead-letter queue) is declared on first use and remembered; a
  publish that fails makes the broker declare again on next use.
* **Delays** never hold a message in a worker: a delay is rounded *up* to whole
  ticks of :data:`DELAY_TICK_S` (0.1 s) and the message routed, by the bits of
  that tick count in its routing key, through the TTL queues whose bits are set,
  highest first, then back to its queue (the "binary cascade" of NServiceBus and
  Celery 5.5, without plugin and without head-of-line blocking: every level queue
  holds messages of one TTL only). A delay is never early; it is late by the
  time RabbitMQ takes to expire and move a message, a few ms per level. The
  levels of a queue are created on first use, from 0 up to the highest one
  needed; the longest delay is ``(2**32 - 1)`` ticks, about 13.6 years.
* **Consuming**: one channel per consumer, ``basic.qos`` prefetch, manual ack.
  Deliveries are pushed by the broker into a local buffer that ``prefetch``
  bounds, each handed to one waiting receiver. ``basic.ack`` has no reply, so
  ``ack()`` only records the ack: they are sent merged (one ``multiple`` ack for
  a settled run of delivery tags, in one socket write) once a quarter of the
  prefetch is pending, as soon as the prefetch is used up, and at most 2 ms
  later; closing the consumer sends them first.
* **Reconnecting**: the connection is aio-pika's robust one. After a reconnect
  each consumer subscribes again (also after the server cancelled it, e.g. a
  deleted queue, which it declares again); deliveries of the dead channel are
  dropped from the buffer, and settling one of them (a stale delivery tag) is
  logged, not raised: RabbitMQ redelivers the message.
* **Noticing a dead link**: the heartbeat defaults to 10 s (RabbitMQ drops a
  silent client after ~20 s, aiormq a silent server after ~33 s). Frames can also
  be lost while the link looks alive (a partition that drops bytes, then heals):
  lost acks leave RabbitMQ believing the consumer is full, lost deliveries leave
  the consumer waiting, and heartbeats then flow again. Each consumer runs a
  watchdog (``watchdog_s``, default 5 s): when it had room for more and received
  nothing for a period, it asks RabbitMQ how many messages are ready (a passive
  declare on a channel of its own). No answer within a period, or ready messages
  at two checks in a row with still nothing received, and it logs
  ``amqp.consumer_stalled`` (one line per detection) and closes the connection;
  aio-pika reconnects and the consumers subscribe again.
* **Headers are not trusted**: the delivery count headers (``x-taskloom-delivered``,
  ``x-delivery-count``) count only as an ``int`` in ``0..2**31-1``; anything else
  (a string, float, bool, negative or enormous number, table) is treated as
  absent, with an ``amqp.bad_header`` warning naming its type. User headers are
  handed over as ``str`` (UTF-8 bytes decoded, integers and booleans as text);
  tables, arrays, floats, decimals, timestamps and other bytes are dropped.
* **Nack and delivery count**: ``nack()`` publishes a copy (confirmed) carrying
  the delivery count in a header, to the back of the queue or through the delay
  cascade, then acks. Quorum queues count the deliveries of a message
  (``x-delivery-count``); classic queues only flag a redelivery, which counts as
  one more. So the ``delivery_limit`` of quorum queues counts deliveries that
  ended without settlement (a crashed or stopped worker, a lost connection), not
  nacks: retries are the runtime's to count.
* **Dead letters**: ``dead_letter(reason)`` publishes a copy to the dead-letter
  queue (confirmed), then acks. On quorum queues RabbitMQ dead-letters a message
  delivered more than ``delivery_limit`` times by itself (at-least-once), with
  reason ``delivery_limit``. ``dead_letters()`` reads without removing: it takes
  the oldest messages with ``basic.get`` on a private channel and hands them back
  (nack with requeue), which puts them back in place; while it runs, another
  reader of the same dead-letter queue sees them as unacked.
* **Closing** a consumer cancels its subscriptions (stop fetching), sends the
  acks made so far and closes its channel, which returns every other unsettled
  delivery to its queue.

Limits: ``stats().in_flight`` counts the deliveries held by this process's
consumers (AMQP does not tell unacked counts without the management plugin).
``stats().delayed`` scans the delay levels of the queue (a message moving down
a level during the scan may be counted twice or missed). On quorum queues the
counts lag a little: deliveries handed back by a closing consumer show in
``ready`` a few milliseconds after ``aclose()`` returned (Raft applies them). Classic queues cannot
count redeliveries after a crash beyond "redelivered": use ``queue_type=quorum``
to dead-letter messages that crash their worker repeatedly. Quorum queues have
no priorities on RabbitMQ 3.x (``capabilities.max_priority`` is 0 there).
RabbitMQ 3.x has no default delivery limit on quorum queues and 4.x a default of
20: this broker always sets ``x-delivery-limit`` explicitly. RabbitMQ < 3.12 only
knows the global ``consumer_timeout`` (rabbitmq.conf); ``consumer_timeout_s``
must match it. Batched publishing and merged acks write frames through aiormq's
channel internals (``write_queue``, confirm bookkeeping), checked at run time,
with a fallback to aiormq's per-message calls.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from types import TracebackType
from typing import Annotated, Any, Final, Literal, Self, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import aiormq.abc
import aiormq.exceptions as aex
import anyio
import anyio.abc
import msgspec
import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from yarl import URL

from brokers.base import (
    BrokerError,
    Capabilities,
    ConnectionFailed,
    ConnectionLost,
    DeadLetter,
    Envelope,
    PublishError,
    QueueNotFound,
    QueueStats,
    ReceiveIteration,
    SettleOnce,
    consumed_queues,
)
from brokers.base import (
    redact_url as _redact,
)

__all__ = [
    "DELAY_LEVELS",
    "DELAY_TICK_S",
    "AmqpBroker",
    "AmqpBrokerOptions",
    "AmqpConsumer",
    "AmqpDelivery",
]

log = structlog.get_logger(__name__)

#: Granularity of delays: a delay is rounded up to a whole number of ticks.
DELAY_TICK_S: Final = 0.1
_TICK_MS: Final = 100
#: Number of delay levels (level k holds messages for 2**k ticks).
DELAY_LEVELS: Final = 32
#: Deliveries of this message before it was (re)published by the broker.
H_DELIVERED: Final = "x-taskloom-delivered"
#: Why a message was dead-lettered.
H_REASON: Final = "x-taskloom-reason"
_INTERNAL_PREFIX: Final = "x-taskloom-"
#: Headers RabbitMQ adds; never shown to users as envelope headers.
_SERVER_HEADERS: Final = frozenset({
    "x-death", "x-delivery-count", "x-first-death-queue", "x-first-death-reason",
    "x-first-death-exchange", "x-last-death-queue", "x-last-death-reason",
    "x-last-death-exchange",
})
_DEFAULT_DELIVERY_LIMIT: Final = 10
#: Largest delivery count a header may carry; larger (or not an int) is ignored.
_MAX_COUNT: Final = 2**31 - 1
#: Longest time an ack waits to be sent with others (when the prefetch is not used up).
_ACK_DELAY_S: Final = 0.002
#: Longest time closing a consumer waits for RabbitMQ (the server may be gone).
_CLOSE_TIMEOUT_S: Final = 10.0
_LEVEL_SUFFIX = re.compile(r"\.delay\.\d\d$")
_STALE = (aex.ChannelInvalidStateError, aex.AMQPError, ConnectionError)


class AmqpBrokerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of :class:`AmqpBroker`, given as query parameters of its URL:
    ``amqp://user:pass@host:5672/vhost?queue_type=quorum&delivery_limit=5``."""

    #: ``classic`` (priorities) or ``quorum`` (replicated, counts deliveries and
    #: dead-letters poison messages by itself after ``delivery_limit``).
    queue_type: Literal["classic", "quorum"] = "classic"
    #: Quorum queues only: deliveries after which RabbitMQ dead-letters a message
    #: with reason ``delivery_limit`` (default 10; always set explicitly).
    delivery_limit: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: Classic queues only: ``x-max-priority`` (0 = no priorities).
    max_priority: Annotated[int, msgspec.Meta(ge=0, le=255)] = 9
    #: The server's ``consumer_timeout`` (rabbitmq.conf; default 30 min): a delivery
    #: held unacked longer is taken back. Task time limits must stay below it.
    consumer_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    #: AMQP heartbeat in seconds (0 = off): RabbitMQ drops a silent client after
    #: ~2x this, the client a silent server after ~3x (aiormq). Default 10 s
    #: (RabbitMQ's own default of 60 s leaves a dead link unnoticed for minutes).
    heartbeat: Annotated[int, msgspec.Meta(ge=0)] = 10
    #: Consumer watchdog period in seconds (0 = off). A consumer that could take
    #: more deliveries but received none for a period asks RabbitMQ (a passive
    #: queue declare on a channel of its own) how many messages are ready. No
    #: answer within a period, or ready messages at two checks in a row with no
    #: delivery in between (acks or deliveries lost on the way: the server
    #: believes the consumer is full), and it logs ``amqp.consumer_stalled`` once
    #: and reconnects; unsettled deliveries are then redelivered.
    watchdog_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    #: Seconds to wait for the connection at ``async with``.
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    #: Seconds a publish waits for its confirm (or for a lost connection to come
    #: back, or for a resource alarm to clear) before it raises.
    publish_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Seconds between reconnection attempts after the connection dropped.
    reconnect_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: Messages ``publish_many`` sends before awaiting their confirms together.
    publish_chunk: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Largest message the runtime may send (RabbitMQ 4.x default ``max_message_size``).
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 * 1024 * 1024
    #: Allow the default ``guest`` user towards a host that is not loopback.
    allow_guest: bool = False

    def __post_init__(self) -> None:
        if self.delivery_limit is not None and self.queue_type != "quorum":
            raise ValueError("delivery_limit needs queue_type=quorum: classic queues have "
                             "no delivery limit")


#: URL query parameters passed through to aio-pika (TLS files, connection name).
_PASSTHROUGH: Final = frozenset({"cafile", "capath", "cadata", "keyfile", "certfile", "name"})


# -- errors ---------------------------------------------------------------------------

@contextmanager
def _mapped(what: str, *, publish: bool = False) -> Iterator[None]:
    """Let errors leave only as ``brokers.base`` types (httpx's map_exceptions)."""
    try:
        yield
    except BrokerError:
        raise
    except aex.PublishError as e:  # a basic.return: mandatory and routed nowhere
        raise PublishError(f"{what}: RabbitMQ could not route the message to any queue "
                           "(was the queue deleted?); it was not stored") from e
    except aex.DeliveryError as e:  # a basic.nack
        raise PublishError(f"{what}: RabbitMQ refused the message (nack: a queue at its "
                           "length limit, or an internal error); it was not stored") from e
    except aex.ChannelNotFoundEntity as e:
        cls = PublishError if publish else QueueNotFound
        raise cls(f"{what}: {e}") from e
    except aex.ChannelPreconditionFailed as e:
        raise BrokerError(f"{what}: {e}; a queue or exchange of that name exists with other "
                          "arguments (another queue_type, max_priority or delivery_limit?): "
                          "use the same options everywhere, or delete it") from e
    except aex.ChannelAccessRefused as e:
        raise BrokerError(f"{what}: {e}; give the user configure/write/read permissions on "
                          "the namespace's queues and exchanges in this vhost") from e
    except TimeoutError as e:
        if publish:
            raise PublishError(f"{what}: no confirm from RabbitMQ in time (connection down, "
                               "or publishers blocked by a memory/disk alarm); the message may "
                               "or may not be stored, retrying may duplicate it") from e
        raise ConnectionLost(f"{what}: RabbitMQ did not answer in time") from e
    except (aex.ChannelInvalidStateError, aex.AMQPConnectionError, aex.ChannelClosed,
            ConnectionError, OSError, RuntimeError) as e:
        raise ConnectionLost(f"{what}: the connection to RabbitMQ was lost ({e!r}); it "
                             "reconnects by itself, the operation may be retried") from e
    except aex.AMQPError as e:
        raise BrokerError(f"{what}: {type(e).__name__}: {e}") from e


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _vhost_of(path: str) -> str:
    """The vhost of a URL path, as aiormq reads it ('' and '/' are '/')."""
    return unquote(path[1:]) if len(path) > 1 else "/"


# -- names ----------------------------------------------------------------------------

class _Queue:
    """Names and declaration state (in this process) of one logical queue."""

    __slots__ = ("amqp", "bound", "created_levels", "declared", "dlq", "levels", "name")

    def __init__(self, prefix: str, name: str) -> None:
        if not name or "*" in name or "#" in name:
            raise ValueError(f"invalid queue name {name!r}: it must be non-empty and "
                             "contain neither '*' nor '#'")
        if name.endswith(".dlq") or _LEVEL_SUFFIX.search(name):
            raise ValueError(f"invalid queue name {name!r}: names ending in '.dlq' or "
                             "'.delay.NN' are reserved for dead-letter and delay queues")
        self.name = name
        self.amqp = prefix + name
        if len(self.amqp.encode()) > _MAX_NAME_BYTES:
            raise ValueError(f"queue name {self.amqp!r} is too long: at most "
                             f"{_MAX_NAME_BYTES} bytes with the namespace (delay routing "
                             "keys need the rest of RabbitMQ's 255)")
        self.dlq = self.amqp + ".dlq"
        self.declared = False
        #: Highest delay level declared (-1: none), and whether the queue is bound to
        #: the delay hand-back exchange.
        self.levels = -1
        self.bound = False
        #: Highest delay level this process ever declared (for purge_namespace).
        self.created_levels = -1

    def level(self, k: int) -> str:
        return f"{self.amqp}.delay.{k:02d}"

    def forget(self) -> None:
        self.declared = self.bound = False
        self.levels = -1


_MAX_NAME_BYTES: Final = 255 - 2 * DELAY_LEVELS - 12


def _ticks(delay_s: float) -> int:
    """A delay in whole ticks, rounded up (never early)."""
    return math.ceil(round(delay_s / DELAY_TICK_S, 6))


def _routing_key(ticks: int, queue: _Queue) -> str:
    """The tick count's bits, most significant first, one word each, then the queue."""
    return ".".join(format(ticks, f"0{DELAY_LEVELS}b")) + "." + queue.amqp


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _count(table: Mapping[str, Any], name: str, message_id: object) -> int | None:
    """The delivery count header ``name`` of ``table``: an ``int`` in
    ``0.._MAX_COUNT``, or None when it is absent or cannot be trusted (a string, a
    float, a bool, a negative or enormous number, a table...). A header that is
    present but unusable is treated as absent, with one warning that names its
    type, never its value: a count only guides retries, and what a publisher could
    say with a hostile count it can say by publishing the message again."""
    value = table.get(name)
    if value is None:
        return None
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return value
    log.warning("amqp.bad_header", header=name, type=type(value).__name__,
                message_id=_bounded(message_id),
                note=f"not an integer in 0..{_MAX_COUNT}: treated as absent (a message "
                     "published outside taskloom, or tampered with)")
    return None


def _bounded(value: object, limit: int = 200) -> str:
    text = _str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _header_value(value: Any) -> str | None:
    """A user header as the runtime sees it (``dict[str, str]``): strings as they
    are, UTF-8 bytes decoded, numbers as text; anything else (tables, arrays,
    timestamps, bytes that are not UTF-8, empty values) is dropped."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -_MAX_COUNT <= value <= _MAX_COUNT else None
    return None


def _user_headers(table: Mapping[str, Any] | None) -> dict[str, str]:
    if not table:
        return {}
    headers: dict[str, str] = {}
    for k, v in table.items():
        if k.startswith(_INTERNAL_PREFIX) or k in _SERVER_HEADERS:
            continue
        text = _header_value(v)
        if text is not None:
            headers[k] = text
    return headers


# -- deliveries -----------------------------------------------------------------------

class AmqpDelivery(SettleOnce):
    """One delivery of an :class:`AmqpConsumer`."""

    __slots__ = ("_channel", "_consumer", "_settled", "_tag", "delivery_count", "envelope")

    def __init__(self, consumer: AmqpConsumer, channel: aiormq.abc.AbstractChannel, tag: int,
                 envelope: Envelope, delivery_count: int) -> None:
        self._consumer = consumer
        self._channel = cast(aiormq.Channel, channel)
        self._tag = tag
        self.envelope = envelope
        self.delivery_count = delivery_count
        self._settled: str | None = None

    def _settle(self, verb: str) -> bool:
        """Claim the settlement for ``verb``; False when it is a no-op."""
        if self._settled is None and self._consumer._closed:
            self._settled = "released"  # handed back when its consumer closed
            return False
        return super()._settle(verb)

    def _stale(self, verb: str, error: BaseException | None = None) -> bool:
        """True (and logged) when the delivery's channel died: RabbitMQ redelivers it."""
        if error is None and not self._channel.is_closed:
            return False
        self._settled = "released"
        log.warning("amqp.stale_delivery", verb=verb, message_id=self.envelope.id,
                    queue=self.envelope.queue, error=repr(error) if error else None,
                    note="its channel closed (reconnect or consumer timeout); RabbitMQ "
                         "redelivers the message, a duplicate execution is expected")
        return True

    async def ack(self) -> None:
        """Done: RabbitMQ drops the message. The ``basic.ack`` (which has no reply) is
        sent within the event loop's next turns, merged with other acks."""
        if self._settle("ack"):
            self._acked("ack")

    def _acked(self, verb: str) -> None:
        if not self._stale(verb):
            self._consumer._ack(self._channel, self._tag)
        self._consumer._release(self)

    async def nack(self, *, delay_s: float = 0.0) -> None:
        if not self._settle("nack"):
            return
        # Republish with the delivery count, then ack: the copy goes to the back of the
        # queue (a basic.nack would put it back in front on quorum queues) and its count
        # stays exact (classic queues only flag redeliveries).
        broker = self._consumer._broker
        envelope = msgspec.structs.replace(self.envelope, delay_s=max(delay_s, 0.0))
        await self._republish("nack", lambda: broker._send(envelope, self.delivery_count))

    async def dead_letter(self, reason: str) -> None:
        if not self._settle("dead_letter"):
            return
        broker = self._consumer._broker
        await self._republish("dead_letter", lambda: broker._send_dead_letter(
            self.envelope, reason, self.delivery_count))

    async def _republish(self, verb: str, publish: Callable[[], Awaitable[None]]) -> None:
        """Publish a copy (confirmed), then ack this delivery."""
        if self._stale(verb):
            self._consumer._release(self)
            return
        try:
            await publish()
        except BaseException:
            self._settled = None  # not settled: retry it, or it is redelivered
            raise
        self._acked(verb)  # if the channel died meanwhile, a duplicate will follow

    async def extend(self) -> None:
        """Nothing to do: an AMQP delivery is held until its channel closes, or until
        the server's ``consumer_timeout`` (``capabilities.consumer_timeout_s``)."""

    def __repr__(self) -> str:
        return (f"AmqpDelivery(id={self.envelope.id!r}, queue={self.envelope.queue!r}, "
                f"delivery_count={self.delivery_count}, settled={self._settled!r})")


class _Acks:
    """Acks waiting to be sent on one channel, merged into as few frames as possible.

    Delivery tags of a channel count up from 1. When every tag up to ``t`` is settled,
    one ``basic.ack(t, multiple=True)`` acks them all; tags above a gap (a delivery
    still held) are acked one by one, all frames in one write. A multiple ack must
    name a tag still unacked (RabbitMQ closes the channel otherwise), so tags acked
    one by one are remembered until the gap below them closes.
    """

    __slots__ = ("channel", "pending", "sent", "upto")

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.pending: list[int] = []
        self.sent: set[int] = set()
        self.upto = 0

    def frames(self) -> list[Basic.Ack]:
        fresh = set(self.pending)
        self.pending = []
        sent, upto, last = self.sent, self.upto, 0
        while True:
            tag = upto + 1
            if tag in fresh:
                fresh.discard(tag)
                last = tag
            elif tag in sent:
                sent.discard(tag)
            else:
                break
            upto = tag
        self.upto = upto
        frames = [Basic.Ack(delivery_tag=last, multiple=True)] if last else []
        for tag in sorted(fresh):
            frames.append(Basic.Ack(delivery_tag=tag))
            sent.add(tag)
        return frames


async def _send_acks(channel: aiormq.Channel, frames: list[Basic.Ack]) -> None:
    write_queue = getattr(channel, "write_queue", None)
    if write_queue is not None:  # all frames in one write (one syscall)
        await write_queue.put(ChannelFrame.marshall(channel_number=channel.number,
                                                    frames=frames))
        return
    for frame in frames:  # pragma: no cover  # aiormq without a public write queue
        await channel.basic_ack(frame.delivery_tag or 0, multiple=frame.multiple, wait=False)


class AmqpConsumer(ReceiveIteration):
    """A consumer on its own channel; see :meth:`AmqpBroker.consume`."""

    def __init__(self, broker: AmqpBroker, queues: Sequence[str], prefetch: int) -> None:
        self._broker = broker
        self._queues = [broker._queue(name) for name in consumed_queues(queues, prefetch)]
        self._prefetch = prefetch
        token = secrets.token_hex(4)
        self._tags = {f"taskloom.{os.getpid()}.{token}.{i}": q for i, q in
                      enumerate(self._queues)}
        self._buffer: deque[aiormq.abc.DeliveredMessage] = deque()
        #: Receivers waiting for a delivery, each woken by exactly one message (a
        #: shared event would wake every concurrent receiver for each message).
        self._waiters: deque[asyncio.Future[aiormq.abc.DeliveredMessage | None]] = deque()
        self._resubscribe = asyncio.Event()
        self._held: dict[str, int] = {}
        self._channel: AbstractRobustChannel | None = None
        self._closed = False
        self._acks: dict[int, _Acks] = {}
        self._ack_wanted = asyncio.Event()
        self._ack_nudge = asyncio.Event()
        self._ack_lock = asyncio.Lock()  # frames must go out in the order they were made
        self._pending_acks = 0
        #: Acks gathered before they are sent at once (a socket write per batch).
        self._ack_batch = max(1, prefetch // 4)
        #: Deliveries received and not settled yet; unacked deliveries RabbitMQ allows.
        self._unsettled = 0
        self._credit = prefetch
        #: Deliveries received so far (the watchdog compares it between checks).
        self._received = 0
        self._probe_channel: aiormq.abc.AbstractChannel | None = None
        #: The prefetch of each queue when it is split between queues (0: shared).
        self._per_queue = 0

    # -- the broker side ---------------------------------------------------------------

    async def _open(self) -> None:
        for q in self._queues:
            await self._broker._declare(q)
        channel = self._broker._connection.channel(publisher_confirms=False)
        self._channel = channel
        with _mapped("opening a consumer"):
            await channel.initialize()
            if len(self._queues) > 1 and not self._broker._quorum:
                # One limit shared by the channel's consumers (RabbitMQ's global qos).
                await channel.set_qos(prefetch_count=self._prefetch, global_=True)
            else:
                # Quorum queues have no global qos: the prefetch is split between queues.
                per = max(1, self._prefetch // len(self._queues))
                self._credit = per * len(self._queues)
                if len(self._queues) > 1:
                    self._per_queue = per
                await channel.set_qos(prefetch_count=per)
            channel.reopen_callbacks.add(self._on_reopen)
            await self._subscribe()

    async def _subscribe(self) -> None:
        """Subscribe every queue not subscribed on the channel's current underlay."""
        assert self._channel is not None
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        for tag, q in self._tags.items():
            if not self._closed and tag not in underlay.consumers:
                await underlay.basic_consume(q.amqp, self._on_message, consumer_tag=tag)

    def _on_reopen(self, *_: Any) -> None:
        self._resubscribe.set()

    def _on_cancelled(self, frame: Basic.Cancel) -> None:
        q = self._tags.get(frame.consumer_tag or "")
        if q is None or self._closed:
            return
        log.warning("amqp.consumer_cancelled_by_server", queue=q.amqp,
                    note="the queue was deleted or moved; declaring it and subscribing again")
        q.forget()
        self._resubscribe.set()

    async def _watch(self) -> None:
        """Subscribe again after a reconnect, or after a cancel by the server."""
        while True:
            await self._resubscribe.wait()
            self._resubscribe.clear()
            if self._closed:
                return
            try:
                for q in self._queues:
                    await self._broker._declare(q)
                with _mapped("subscribing again"):
                    await self._subscribe()
                log.info("amqp.consumer_resubscribed", queues=[q.amqp for q in self._queues])
            except Exception as e:  # never let the consumer's task group crash
                log.warning("amqp.resubscribe_failed", error=str(e), retry_in_s=1.0)
                await anyio.sleep(1.0)
                self._resubscribe.set()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._received += 1
        self._handoff(message)

    # -- the watchdog ------------------------------------------------------------------

    def _has_credit(self) -> bool:
        """RabbitMQ may send more: fewer deliveries held, buffered or awaiting their
        ack than the prefetch allows."""
        return self._unsettled + len(self._buffer) + self._pending_acks < self._credit

    async def _watchdog(self) -> None:
        """Notice a consumer that stopped receiving (see ``watchdog_s``) and
        re-establish it by reconnecting. Costs nothing while deliveries flow or
        the prefetch is used up; one passive declare per queue and period while
        idle."""
        period = self._broker.options.watchdog_s
        if not period:
            return
        seen, strikes = self._received, 0
        while True:
            await anyio.sleep(period)
            if self._closed:
                return
            if self._received != seen or not self._has_credit():
                seen, strikes = self._received, 0
                continue
            transport = self._broker._conn.transport if self._broker._conn else None
            if transport is None or transport.connection.is_closed:
                strikes = 0  # reconnecting already
                continue
            connection = transport.connection
            try:
                ready = await self._probe(connection, timeout=period)
            except TimeoutError:
                await self._broker._reconnect(
                    connection, f"RabbitMQ did not answer the consumer's watchdog within "
                    f"{period:g} s (a network partition or a dead link the heartbeat has "
                    "not noticed yet)", queues=[q.amqp for q in self._queues])
                seen, strikes = self._received, 0
                continue
            except Exception as e:  # the probe's own failure is not a stall
                log.debug("amqp.watchdog_probe_failed", error=repr(e))
                strikes = 0
                continue
            if self._received != seen or not ready:
                seen, strikes = self._received, 0
                continue
            strikes += 1
            if strikes >= 2:
                await self._broker._reconnect(
                    connection, f"no delivery for {2 * period:g} s while {ready} messages are "
                    "ready and the consumer has room (deliveries or acks lost on the way)",
                    queues=[q.amqp for q in self._queues])
                seen, strikes = self._received, 0

    async def _probe(self, connection: aiormq.abc.AbstractConnection, *, timeout: float) -> int:
        """Messages ready in this consumer's queues, asked on a channel of its own;
        TimeoutError when RabbitMQ does not answer within ``timeout``."""
        ready = 0
        full: set[str] = set()
        if self._per_queue:  # a queue at its own prefetch gets nothing more: skip it
            tags = self._tags
            names = [tags[tag].name for m in self._buffer
                     if isinstance(m.delivery, Basic.Deliver)
                     and (tag := m.delivery.consumer_tag or "") in tags]
            full = {q.name for q in self._queues
                    if self._held.get(q.name, 0) + names.count(q.name) + self._pending_acks
                    >= self._per_queue}
        with anyio.fail_after(timeout):
            for q in self._queues:
                if q.name in full:
                    continue
                channel = self._probe_channel
                if channel is None or channel.is_closed or channel.connection is not connection:
                    channel = self._probe_channel = await connection.channel(
                        publisher_confirms=False)
                try:
                    ok = await channel.queue_declare(q.amqp, passive=True)
                except aex.ChannelNotFoundEntity:
                    continue  # deleted: the server cancels the consumer, _watch redeclares
                ready += ok.message_count or 0
        return ready

    def _handoff(self, message: aiormq.abc.DeliveredMessage, *, first: bool = False) -> None:
        """Wake one waiting receiver with ``message``, or buffer it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(message)
                return
        if first:
            self._buffer.appendleft(message)
        else:
            self._buffer.append(message)

    def _release(self, delivery: AmqpDelivery) -> None:
        if self._closed:
            return  # counted off when the consumer closed
        name = delivery.envelope.queue
        self._unsettled -= 1
        self._held[name] -= 1
        self._broker._in_flight[name] -= 1

    def _ack(self, channel: aiormq.Channel, tag: int) -> None:
        acks = self._acks.get(id(channel))
        if acks is None or acks.channel is not channel:
            acks = self._acks[id(channel)] = _Acks(channel)
        acks.pending.append(tag)
        self._pending_acks += 1
        self._ack_wanted.set()
        if self._acks_due():
            self._ack_nudge.set()

    def _acks_due(self) -> bool:
        """A batch is full, or the prefetch is used up (RabbitMQ sends nothing more
        until acks free credits, so waiting would stall the consumer)."""
        pending = self._pending_acks
        return pending >= self._ack_batch or (
            pending > 0 and self._unsettled + pending + len(self._buffer) >= self._credit)

    async def _ack_loop(self) -> None:
        """Send acks merged: once a quarter of the prefetch is pending, or when the
        prefetch is used up, and at most ``_ACK_DELAY_S`` after the first one."""
        while True:
            await self._ack_wanted.wait()
            with anyio.move_on_after(_ACK_DELAY_S):
                while not self._acks_due():
                    self._ack_nudge.clear()
                    await self._ack_nudge.wait()
            self._ack_wanted.clear()
            try:
                await self._flush_acks()
            except Exception as e:  # never let the consumer's task group crash
                log.warning("amqp.ack_flush_failed", error=repr(e),
                            note="unsent acks: RabbitMQ redelivers those messages")

    async def _flush_acks(self) -> None:
        self._pending_acks = 0
        async with self._ack_lock:
            await self._flush_acks_locked()

    async def _flush_acks_locked(self) -> None:
        for key, acks in list(self._acks.items()):
            channel = acks.channel
            if channel.is_closed:
                del self._acks[key]
                if acks.pending:
                    log.warning("amqp.stale_acks", count=len(acks.pending),
                                note="their channel closed before the acks were sent; "
                                     "RabbitMQ redelivers the messages (duplicates)")
                continue
            if not acks.pending:
                continue
            try:
                await _send_acks(channel, acks.frames())
            except _STALE as e:
                log.warning("amqp.stale_acks", error=repr(e),
                            note="RabbitMQ redelivers the messages (duplicates)")

    # -- the user side -----------------------------------------------------------------

    def _delivery(self, message: aiormq.abc.DeliveredMessage) -> AmqpDelivery:
        deliver = cast(Basic.Deliver, message.delivery)
        props = message.header.properties
        table = props.headers
        name = self._tags[deliver.consumer_tag or ""].name
        if table:
            count = (_count(table, H_DELIVERED, props.message_id) or 0) + 1
            server = _count(table, "x-delivery-count", props.message_id)
            if server is not None:
                count += server
            elif deliver.redelivered:
                count += 1
            headers = _user_headers(table)
        else:
            count = 2 if deliver.redelivered else 1
            headers = {}
        envelope = Envelope(id=props.message_id or "", queue=name, body=message.body,
                            headers=headers, priority=props.priority or 0)
        self._unsettled += 1
        held = self._held
        held[name] = held.get(name, 0) + 1
        in_flight = self._broker._in_flight
        in_flight[name] = in_flight.get(name, 0) + 1
        return AmqpDelivery(self, message.channel, deliver.delivery_tag or 0, envelope, count)

    async def receive(self) -> AmqpDelivery:
        """The next delivery; blocks until one is ready. Raises ``anyio.EndOfStream``
        once the consumer is closed."""
        buffer = self._buffer
        while True:
            if self._closed:
                raise anyio.EndOfStream
            if buffer:
                message: aiormq.abc.DeliveredMessage | None = buffer.popleft()
            else:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    message = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled() and waiter.result():
                        # Handed a message, then cancelled: pass it on, do not drop it.
                        buffer.appendleft(waiter.result())
                        self._pass_on()
                    elif waiter in self._waiters:
                        self._waiters.remove(waiter)
                    raise
            if message is None or message.channel.is_closed:
                continue  # woken by aclose(), or its channel died: RabbitMQ redelivers it
            return self._delivery(message)

    def _pass_on(self) -> None:
        """Give the buffer's first message to a waiting receiver, if any."""
        if self._buffer and self._waiters:
            self._handoff(self._buffer.popleft(), first=True)

    async def aclose(self) -> None:
        """Stop fetching (``basic.cancel``), then close the channel, which hands every
        unsettled delivery back to its queue. Idempotent."""
        if self._closed:
            return
        self._closed = True
        while self._waiters:  # wake every receiver: each raises EndOfStream
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self._resubscribe.set()
        self._broker._consumers.discard(self)
        for name, held in self._held.items():
            self._broker._in_flight[name] -= held
        self._held.clear()
        channel = self._channel
        if channel is not None:
            # Bounded: callers shield this from cancellation, and the server may be gone.
            with anyio.move_on_after(_CLOSE_TIMEOUT_S):
                await self._close_channel(channel)

    async def _close_channel(self, channel: AbstractRobustChannel) -> None:
        try:
            if not channel.is_closed:
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                for tag in self._tags:
                    if tag in underlay.consumers:
                        await underlay.basic_cancel(tag)
        except Exception as e:  # closing anyway: the channel close requeues
            log.debug("amqp.cancel_failed", error=repr(e))
        finally:
            try:
                await self._flush_acks()  # acks made before closing must not be undone
            except Exception as e:
                log.debug("amqp.ack_flush_failed", error=repr(e))
            self._buffer.clear()
            try:
                await channel.close()
            except Exception as e:
                log.debug("amqp.channel_close_failed", error=repr(e))
            probe, self._probe_channel = self._probe_channel, None
            if probe is not None and not probe.is_closed:
                try:
                    await probe.close()
                except Exception as e:
                    log.debug("amqp.channel_close_failed", error=repr(e))

    def __repr__(self) -> str:
        return (f"AmqpConsumer(queues={[q.amqp for q in self._queues]}, "
                f"prefetch={self._prefetch})")


# -- the broker -----------------------------------------------------------------------

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


_Item = tuple[str, str, bytes, Basic.Properties]

# -- batched publishing ---------------------------------------------------------------

#: Bytes of frames written at once by a batched publish.
_WRITE_BYTES: Final = 256 * 1024
_BATCH_ATTRIBUTES: Final = ("confirmations", "delivery_tag", "message_id_delivery_tag",
                            "write_queue", "max_content_size", "lock", "create_future")


def _can_batch(channel: aiormq.Channel) -> bool:
    return channel.publisher_confirms and all(
        hasattr(channel, name) for name in _BATCH_ATTRIBUTES)


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int,
                       _: asyncio.Future[Any]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)


async def _send_batch(channel: aiormq.Channel, items: Sequence[_Item]) -> list[asyncio.Future[Any]]:
    """Publish ``items`` (mandatory) in a few socket writes; their confirm futures.

    aiormq's ``basic_publish`` writes every message on its own, which costs a system
    call per message. This does what it does (a delivery tag and a confirm future per
    message, under the channel lock, registered for returns by message id) but
    writes the frames of many messages at once. Registrations of messages not
    written when it fails (or is cancelled) are rolled back, as aiormq does.
    """
    confirms: list[asyncio.Future[Any]] = []
    async with channel.lock:
        committed, n_committed = channel.delivery_tag, 0  # what the broker will see
        frames: list[Any] = []
        size = 0
        try:
            for i, (exchange, key, body, props) in enumerate(items):
                if not props.message_id:
                    props.message_id = secrets.token_hex(16)
                channel.delivery_tag += 1
                tag = channel.delivery_tag
                confirm = channel.create_future()
                channel.confirmations[tag] = confirm
                channel.message_id_delivery_tag[props.message_id] = tag
                confirm.add_done_callback(
                    partial(_forget_message_id, channel, props.message_id, tag))
                confirms.append(confirm)
                frames.append(Basic.Publish(exchange=exchange, routing_key=key, mandatory=True))
                frames.append(ContentHeader(properties=props, body_size=len(body)))
                step = channel.max_content_size
                frames.extend(ContentBody(body[j:j + step]) for j in range(0, len(body), step))
                size += len(body) + 64
                if size >= _WRITE_BYTES or i == len(items) - 1:
                    await channel.write_queue.put(
                        ChannelFrame.marshall(channel_number=channel.number, frames=frames))
                    committed, n_committed = channel.delivery_tag, len(confirms)
                    frames, size = [], 0
        except BaseException:
            # The broker never saw the messages after ``committed``: give their
            # delivery tags back, or later confirms would be matched to wrong messages.
            for tag in range(committed + 1, channel.delivery_tag + 1):
                channel.confirmations.pop(tag, None)
            channel.delivery_tag = committed
            for confirm in confirms[n_committed:]:
                confirm.cancel()
            raise
    return confirms



class _Consuming:
    """The context manager of :meth:`AmqpBroker.consume`.

    It owns the task group of the consumer's helpers (re-subscription, ack
    sending) without wrapping the block's own errors in an exception group, as a
    task group around the block would.
    """

    def __init__(self, consumer: AmqpConsumer) -> None:
        self._consumer = consumer
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AmqpConsumer:
        consumer = self._consumer
        consumer._broker._connection  # noqa: B018  # raises when not connected
        tg = self._tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            consumer._broker._consumers.add(consumer)
            await consumer._open()
            tg.start_soon(consumer._watch)
            tg.start_soon(consumer._ack_loop)
            tg.start_soon(consumer._watchdog)
        except BaseException:
            await self._close()
            raise
        return consumer

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._consumer.aclose()
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)


class AmqpBroker:
    """RabbitMQ broker. ``AmqpBroker.from_url("amqp://user:pass@host:5672/vhost")``."""

    def __init__(self, url: str = "amqp://guest:guest@localhost:5672/", *,
                 namespace: str = "", options: AmqpBrokerOptions | None = None) -> None:
        if "*" in namespace or "#" in namespace:
            raise ValueError(f"namespace {namespace!r} must contain neither '*' nor '#'")
        self.options = options = options or AmqpBrokerOptions()
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"not an AMQP URL: {_redact(url)} (use amqp:// or amqps://)")
        host = parts.hostname or "localhost"
        user = unquote(parts.username) if parts.username else "guest"
        if user == "guest" and not _is_loopback(host) and not options.allow_guest:
            raise ValueError(
                f"refusing the default 'guest' user towards {host!r}, which is not a loopback "
                "address (RabbitMQ refuses it too, and default credentials are unsafe): create "
                "a user for this application, or add ?allow_guest=true to the URL")
        self.url = url
        self.namespace = namespace
        #: The vhost (URL path): one swarm of workers and producers shares one vhost.
        self.vhost = _vhost_of(parts.path)
        self._quorum = options.queue_type == "quorum"
        #: ``x-delivery-limit`` of quorum queues (None for classic queues).
        self.delivery_limit = ((options.delivery_limit or _DEFAULT_DELIVERY_LIMIT)
                               if self._quorum else None)
        self.capabilities = Capabilities(
            max_priority=0 if self._quorum else options.max_priority,
            native_delay=True,
            max_message_bytes=options.max_message_bytes,
            dead_letter=True,
            lease_s=None,
            consumer_timeout_s=options.consumer_timeout_s,
        )
        self._prefix = f"{namespace}." if namespace else ""
        self._dlx = f"{self._prefix}taskloom.dlx"
        self._handback = f"{self._prefix}taskloom.delay"
        self._queues: dict[str, _Queue] = {}
        self._in_flight: dict[str, int] = {}
        self._consumers: set[AmqpConsumer] = set()
        self._conn: aio_pika.RobustConnection | None = None
        self._pub: AbstractRobustChannel | None = None
        self._topology: aiormq.abc.AbstractChannel | None = None
        self._declare_lock = asyncio.Lock()
        #: Exchanges declared by this broker, and the highest delay level exchange.
        self._exchanges: set[str] = set()
        self._exchange_levels = -1
        #: Everything this broker ever declared (for purge_namespace).
        self._created_exchanges: set[str] = set()

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "") -> AmqpBroker:
        """``amqp://`` or ``amqps://`` URL. Its path is the vhost (``/`` when empty);
        query parameters named like :class:`AmqpBrokerOptions` fields configure the
        broker; TLS files (``cafile``, ``capath``, ``cadata``, ``certfile``,
        ``keyfile``) and the connection ``name`` go to aio-pika."""
        parts = urlsplit(url)
        known = set(AmqpBrokerOptions.__struct_fields__)
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in known:
                ours[key] = value
            elif key in _PASSTHROUGH:
                theirs.append((key, value))
            else:
                raise ValueError(
                    f"unknown AMQP broker option {key!r} in {_redact(url)}; known options: "
                    f"{', '.join(sorted(known | _PASSTHROUGH))}")
        try:
            options = msgspec.convert(ours, AmqpBrokerOptions, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid AMQP broker option in {_redact(url)}: {e}") from None
        return cls(urlunsplit(parts._replace(query=urlencode(theirs))),
                   namespace=namespace, options=options)

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

    def _connect_url(self) -> str:
        parts = urlsplit(self.url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        query += [("heartbeat", str(self.options.heartbeat)),
                  ("reconnect_interval", str(self.options.reconnect_interval_s))]
        return urlunsplit(parts._replace(query=urlencode(query)))

    async def __aenter__(self) -> Self:
        if self._conn is not None:
            return self
        name = f"taskloom {self.namespace or '-'} pid={os.getpid()}"
        conn = aio_pika.RobustConnection(
            URL(self._connect_url()), client_properties={"connection_name": name})
        try:
            await conn.connect(timeout=self.options.connect_timeout_s)
            pub = conn.channel(publisher_confirms=True, on_return_raises=True)
            await pub.initialize()
        except Exception as e:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise ConnectionFailed(
                f"could not connect to RabbitMQ at {_redact(self.url)} (vhost "
                f"{self.vhost!r}): {type(e).__name__}: {e}; check that the server runs and is "
                "reachable, the user and password, and that the vhost exists and the user "
                "has permissions on it") from e
        self._conn = conn
        self._pub = pub
        return self

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
            self._conn = self._pub = self._topology = None
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
        with anyio.move_on_after(_CLOSE_TIMEOUT_S):
            try:
                # aiormq sends Connection.Close and waits at most a few seconds for
                # the answer, then drops the socket; aio-pika then reconnects.
                await connection.close(lost)
            except Exception as e:
                log.debug("amqp.close_failed", error=repr(e))

    async def _raw_channel(self) -> aiormq.abc.AbstractChannel:
        """A plain aiormq channel on the current connection (waits for a reconnect)."""
        conn = self._connection
        with _mapped("opening a channel"), anyio.fail_after(self.options.publish_timeout_s):
            while True:
                await conn.ready()
                transport = conn.transport
                if transport is not None and not transport.connection.is_closed:
                    return await transport.connection.channel(publisher_confirms=False)
                await anyio.sleep(0.05)  # between two connection attempts

    # -- topology ----------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(self._prefix, name)
        return q

    def _forget_all(self) -> None:
        for q in self._queues.values():
            q.forget()
        self._exchanges.clear()
        self._exchange_levels = -1

    def _level_exchange(self, k: int) -> str:
        return f"{self._prefix}taskloom.delay.{k:02d}"

    def _below(self, k: int) -> str:
        """Where level ``k`` sends messages whose time there is up."""
        return self._level_exchange(k - 1) if k else self._handback

    def _queue_arguments(self) -> dict[str, Any]:
        if self._quorum:
            return {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit,
                    "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        if self.options.max_priority:
            return {"x-max-priority": self.options.max_priority}
        return {}

    async def _topology_channel(self) -> aiormq.abc.AbstractChannel:
        if self._topology is None or self._topology.is_closed:
            self._topology = await self._raw_channel()
        return self._topology

    async def _exchange(self, channel: aiormq.abc.AbstractChannel, name: str, kind: str) -> None:
        if name not in self._exchanges:
            await channel.exchange_declare(name, exchange_type=kind, durable=True)
            self._exchanges.add(name)
            self._created_exchanges.add(name)

    async def _declare(self, q: _Queue) -> None:
        """The queue and its dead-letter queue (idempotent; remembered)."""
        if q.declared:
            return
        async with self._declare_lock:
            if q.declared:
                return
            with _mapped(f"declaring queue {q.amqp!r}"):
                ch = await self._topology_channel()
                await self._exchange(ch, self._dlx, "direct")
                await ch.queue_declare(q.dlq, durable=True)
                await ch.queue_bind(q.dlq, self._dlx, routing_key=q.amqp)
                args = {"x-dead-letter-exchange": self._dlx,
                        "x-dead-letter-routing-key": q.amqp, **self._queue_arguments()}
                await ch.queue_declare(q.amqp, durable=True, arguments=args)
            q.declared = True

    async def _declare_delays(self, q: _Queue, top: int) -> None:
        """Delay levels 0..``top`` of ``q``, their exchanges and the way back to ``q``."""
        if q.levels >= top and q.bound:
            return
        async with self._declare_lock:
            with _mapped(f"declaring delay levels of {q.amqp!r}"):
                await self._declare_levels(q, top)

    async def _declare_levels(self, q: _Queue, top: int) -> None:
        """Under the declaration lock: see :meth:`_declare_delays`."""
        ch = await self._topology_channel()
        await self._exchange(ch, self._handback, "topic")
        for k in range(self._exchange_levels + 1, top + 1):
            await self._exchange(ch, self._level_exchange(k), "topic")
            # Bit k clear: on to the level below, at once.
            await ch.exchange_bind(self._below(k), self._level_exchange(k),
                                   "*." * (DELAY_LEVELS - 1 - k) + "0.#")
            self._exchange_levels = k
        for k in range(q.levels + 1, top + 1):
            args: dict[str, Any] = {"x-message-ttl": _TICK_MS << k,
                                    "x-dead-letter-exchange": self._below(k)}
            if self._quorum:
                args.update({"x-queue-type": "quorum",
                             "x-dead-letter-strategy": "at-least-once",
                             "x-overflow": "reject-publish"})
            await ch.queue_declare(q.level(k), durable=True, arguments=args)
            # Bit k set: wait 2**k ticks in this queue (exactly this queue's words).
            await ch.queue_bind(q.level(k), self._level_exchange(k),
                                routing_key="*." * (DELAY_LEVELS - 1 - k) + "1."
                                + "*." * k + q.amqp)
            q.levels = k
            q.created_levels = max(q.created_levels, k)
        if not q.bound:
            await ch.queue_bind(q.amqp, self._handback,
                                routing_key="*." * DELAY_LEVELS + q.amqp)
            q.bound = True

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
        priority = None
        if envelope.priority > 0 and self.capabilities.max_priority:
            priority = min(envelope.priority, self.capabilities.max_priority)
        return Basic.Properties(delivery_mode=2, message_id=envelope.id or None,
                                priority=priority, headers=headers)

    async def _item(self, envelope: Envelope, delivered: int = 0) -> _Item:
        """Declare what ``envelope`` needs; its exchange, routing key, body, properties."""
        q = self._queues.get(envelope.queue) or self._queue(envelope.queue)
        if not q.declared:
            await self._declare(q)
        properties = self._properties(envelope, delivered)
        if envelope.delay_s <= 0:
            return "", q.amqp, envelope.body, properties
        ticks = _ticks(envelope.delay_s)
        if ticks >= 1 << DELAY_LEVELS:
            raise PublishError(f"a delay of {envelope.delay_s} s is longer than the longest "
                               f"delay ({((1 << DELAY_LEVELS) - 1) * DELAY_TICK_S:.0f} s)")
        top = ticks.bit_length() - 1
        await self._declare_delays(q, top)
        return self._level_exchange(top), _routing_key(ticks, q), envelope.body, properties

    async def _publisher_channel(self) -> aiormq.Channel:
        """The publisher's live underlay channel (after a reconnect, once restored)."""
        publisher = self._publisher
        while True:
            await publisher.ready()
            channel = cast(aiormq.Channel, await publisher.get_underlay_channel())
            if not channel.is_closed:
                return channel
            await anyio.sleep(0.01)  # closed, and its close callback has not run yet

    async def _publish(self, items: Sequence[_Item], what: str) -> None:
        """Send ``items`` and await all their confirms."""
        try:
            with _mapped(what, publish=True), anyio.fail_after(self.options.publish_timeout_s):
                ch = await self._publisher_channel()
                if len(items) == 1:
                    exchange, key, body, props = items[0]
                    await ch.basic_publish(body, exchange=exchange, routing_key=key,
                                           properties=props, mandatory=True, wait=False)
                    return
                if _can_batch(ch):
                    confirms = await _send_batch(ch, items)
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
        except PublishError:
            # A queue or exchange deleted behind our back: declare it again next time.
            self._forget_all()
            raise

    async def publish(self, envelope: Envelope) -> None:
        """Store one message durably; returns once RabbitMQ confirmed it. Raises
        :class:`~brokers.base.PublishError` when it is unroutable or refused."""
        await self._publish([await self._item(envelope)], f"publish to {envelope.queue!r}")

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Store many messages: each chunk is sent at once, then its confirms awaited
        together. All-or-error; on error any subset may be stored."""
        chunk = self.options.publish_chunk
        what = f"publish_many ({len(envelopes)} messages)"
        for i in range(0, len(envelopes), chunk):
            await self._publish([await self._item(e) for e in envelopes[i:i + chunk]], what)

    async def _send(self, envelope: Envelope, delivered: int) -> None:
        """Publish ``envelope`` again (a nack), with the deliveries it had."""
        await self._publish([await self._item(envelope, delivered)],
                            f"nack of {envelope.id!r} in {envelope.queue!r}")

    async def _send_dead_letter(self, envelope: Envelope, reason: str, delivered: int) -> None:
        q = self._queue(envelope.queue)
        await self._declare(q)
        props = self._properties(envelope, delivered, reason)
        await self._publish([(self._dlx, q.amqp, envelope.body, props)],
                            f"dead-lettering {envelope.id!r} of {envelope.queue!r}")

    # -- consuming ---------------------------------------------------------------------

    def consume(self, queues: Sequence[str], *, prefetch: int) -> _Consuming:
        """A consumer of ``queues`` on its own channel, holding at most ``prefetch``
        unsettled deliveries: ``async with broker.consume(["q"], prefetch=10) as c``.
        Leaving the block closes it (see :meth:`AmqpConsumer.aclose`), even when
        cancelled; an error raised in the block comes out as it is."""
        return _Consuming(AmqpConsumer(self, queues, prefetch))

    # -- inspection --------------------------------------------------------------------

    async def stats(self, queue: str) -> QueueStats:
        """``ready`` and ``dead`` from RabbitMQ; ``delayed`` summed over the queue's
        delay levels; ``in_flight`` held by this process's consumers only."""
        q = self._queue(queue)
        in_flight = max(self._in_flight.get(queue, 0), 0)
        scratch = _Scratch(self)
        try:
            with _mapped(f"stats of {queue!r}"):
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
            with _mapped(f"purging {queue!r}"):
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
        """The oldest dead letters of ``queue``, left in place: taken with
        ``basic.get`` on a private channel, then handed back (nack with requeue),
        which restores their order."""
        q = self._queue(queue)
        if limit <= 0:
            return []
        scratch = _Scratch(self)
        messages: list[aiormq.abc.DeliveredMessage] = []
        try:
            with _mapped(f"reading dead letters of {queue!r}"):
                ch = await scratch.channel()
                try:
                    while len(messages) < limit:
                        message = await ch.basic_get(q.dlq, no_ack=False)
                        if not isinstance(message.delivery, Basic.GetOk):
                            break
                        messages.append(message)
                except aex.ChannelNotFoundEntity:
                    return []
                finally:
                    if messages and not ch.is_closed:
                        tag = cast(Basic.GetOk, messages[-1].delivery).delivery_tag or 0
                        await cast(aiormq.Channel, ch).basic_nack(tag, multiple=True,
                                                                  requeue=True)
        finally:
            await scratch.aclose()
        return [self._dead_letter(q, m) for m in messages]

    def _dead_letter(self, q: _Queue, message: aiormq.abc.DeliveredMessage) -> DeadLetter:
        props = message.header.properties
        table: Mapping[str, Any] = props.headers or {}
        envelope = Envelope(id=props.message_id or "", queue=q.name, body=message.body,
                            headers=_user_headers(table), priority=props.priority or 0)
        delivered = _count(table, H_DELIVERED, props.message_id) or 0
        reason = table.get(H_REASON)
        if reason is not None:  # dead-lettered by dead_letter(): the count is exact
            return DeadLetter(envelope=envelope, reason=_bounded(reason),
                              delivery_count=delivered)
        # Dead-lettered by RabbitMQ: the newest x-death entry of the queue says why.
        deaths = table.get("x-death") or []
        why = next((d.get("reason") for d in deaths
                    if isinstance(d, dict) and d.get("queue") == q.amqp), None)
        why = _bounded(why or table.get("x-first-death-reason") or "unknown")
        if why == "delivery_limit" and self.delivery_limit is not None:
            delivered += self.delivery_limit + 1
        elif why == "rejected":
            delivered += 1
        return DeadLetter(envelope=envelope, reason=why, delivery_count=delivered)

    async def purge_namespace(self) -> int:
        """Test helper: delete the queues and exchanges this broker declared under its
        namespace (with their dead-letter and delay queues). Returns how many."""
        if not self.namespace:
            raise ValueError("purge_namespace() needs a namespace: without one it would "
                             "delete queues shared with other applications")
        deleted = 0
        with _mapped("purging the namespace"):
            ch = await self._raw_channel()
            try:
                for q in self._queues.values():  # deleting a missing queue is fine
                    for k in range(q.created_levels, -1, -1):
                        await ch.queue_delete(q.level(k))
                    await ch.queue_delete(q.amqp)
                    await ch.queue_delete(q.dlq)
                    deleted += 2 + q.created_levels + 1
                for name in sorted(self._created_exchanges, reverse=True):
                    await ch.exchange_delete(name)
                    deleted += 1
            finally:
                await ch.close()
        self._created_exchanges.clear()
        self._forget_all()
        for q in self._queues.values():
            q.created_levels = -1
        return deleted

    def __repr__(self) -> str:
        return (f"AmqpBroker({_redact(self.url)!r}, namespace={self.namespace!r}, "
                f"queue_type={self.options.queue_type!r})")
