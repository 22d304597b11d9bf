"""The AMQP topology: names, declarations, and the TTL-cascade delay levels.

Layout in the URL's vhost, every name under the namespace prefix ``<ns>.`` (none
when the namespace is empty)::

    <ns>.<queue>               the queue: durable, classic (x-max-priority) or quorum
                               (x-delivery-limit, at-least-once dead-lettering)
    <ns>.<queue>.dlq           its dead letters (classic, durable), bound to the DLX
    <ns>.<queue>.dlq.lock      transient, single-active-consumer: whoever holds its one
                               token message reads or removes single dead letters
                               (:mod:`brokers.amqp.deadletters`)
    <ns>.taskloom.dlx          direct exchange: routing key <ns>.<queue> -> <queue>.dlq
    <ns>.<queue>.delay.NN      delay level NN: messages wait 2**NN ticks (TTL), then are
                               dead-lettered to the level below
    <ns>.taskloom.delay.NN     topic exchange of level NN
    <ns>.taskloom.delay        topic exchange that hands delayed messages back to queues

The queue (and its dead-letter queue) is declared on first use and remembered;
a publish that fails makes the broker declare again on next use
(:meth:`Topology.forget_all`).

**Delays** never hold a message in a worker: a delay is rounded *up* to whole
ticks of :data:`DELAY_TICK_S` (0.1 s) and the message routed, by the bits of
that tick count in its routing key, through the TTL queues whose bits are set,
highest first, then back to its queue (the "binary cascade" of NServiceBus and
Celery 5.5, without plugin and without head-of-line blocking: every level queue
holds messages of one TTL only). A delay is never early; it is late by the
time RabbitMQ takes to expire and move a message, a few ms per level. The
levels of a queue are created on first use, from 0 up to the highest one
needed; the longest delay is ``(2**32 - 1)`` ticks, about 13.6 years.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiormq.abc

from brokers.amqp.errors import mapped
from brokers.base import ConfigError, PublishError

__all__ = ["DELAY_LEVELS", "DELAY_TICK_S", "Queue", "Topology", "routing_key", "ticks"]

#: Granularity of delays: a delay is rounded up to a whole number of ticks.
DELAY_TICK_S: Final = 0.1
_TICK_MS: Final = 100
#: Number of delay levels (level k holds messages for 2**k ticks).
DELAY_LEVELS: Final = 32
_LEVEL_SUFFIX = re.compile(r"\.delay\.\d\d$")
_MAX_NAME_BYTES: Final = 255 - 2 * DELAY_LEVELS - 12


class Queue:
    """Names and declaration state (in this process) of one logical queue."""

    __slots__ = ("amqp", "bound", "created_levels", "declared", "dlq", "dlq_lock", "levels",
                 "name")

    def __init__(self, prefix: str, name: str) -> None:
        if not name or "*" in name or "#" in name:
            raise ConfigError(f"invalid queue name {name!r}: it must be non-empty and "
                             "contain neither '*' nor '#'")
        if name.endswith((".dlq", ".dlq.lock")) or _LEVEL_SUFFIX.search(name):
            raise ConfigError(f"invalid queue name {name!r}: names ending in '.dlq', "
                             "'.dlq.lock' or '.delay.NN' are reserved for dead-letter and "
                             "delay queues")
        self.name = name
        self.amqp = prefix + name
        if len(self.amqp.encode()) > _MAX_NAME_BYTES:
            raise ConfigError(f"queue name {self.amqp!r} is too long: at most "
                             f"{_MAX_NAME_BYTES} bytes with the namespace (delay routing "
                             "keys need the rest of RabbitMQ's 255)")
        self.dlq = self.amqp + ".dlq"
        self.dlq_lock = self.dlq + ".lock"
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


def ticks(delay_s: float) -> int:
    """A delay in whole ticks, rounded up (never early)."""
    return math.ceil(round(delay_s / DELAY_TICK_S, 6))


def routing_key(n_ticks: int, queue: Queue) -> str:
    """The tick count's bits, most significant first, one word each, then the queue."""
    return ".".join(format(n_ticks, f"0{DELAY_LEVELS}b")) + "." + queue.amqp


class Topology:
    """The queues and exchanges of one broker's namespace, declared on first use
    (on a raw channel of its own) and remembered."""

    def __init__(self, prefix: str, *, quorum: bool, delivery_limit: int | None,
                 max_priority: int,
                 raw_channel: Callable[[], Awaitable[aiormq.abc.AbstractChannel]]) -> None:
        self._prefix = prefix
        self._quorum = quorum
        self._delivery_limit = delivery_limit
        self._max_priority = max_priority
        self._raw_channel = raw_channel
        self.dlx = f"{prefix}taskloom.dlx"
        self.handback = f"{prefix}taskloom.delay"
        self.queues: dict[str, Queue] = {}
        self.channel: aiormq.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        #: Exchanges declared by this broker, and the highest delay level exchange.
        self._exchanges: set[str] = set()
        self._exchange_levels = -1
        #: Everything this broker ever declared (for purge_namespace).
        self.created_exchanges: set[str] = set()

    def queue(self, name: str) -> Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = Queue(self._prefix, name)
        return q

    def forget_all(self) -> None:
        for q in self.queues.values():
            q.forget()
        self._exchanges.clear()
        self._exchange_levels = -1

    def level_exchange(self, k: int) -> str:
        return f"{self._prefix}taskloom.delay.{k:02d}"

    def _below(self, k: int) -> str:
        """Where level ``k`` sends messages whose time there is up."""
        return self.level_exchange(k - 1) if k else self.handback

    def _queue_arguments(self) -> dict[str, Any]:
        if self._quorum:
            return {"x-queue-type": "quorum", "x-delivery-limit": self._delivery_limit,
                    "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        if self._max_priority:
            return {"x-max-priority": self._max_priority}
        return {}

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        if self.channel is None or self.channel.is_closed:
            self.channel = await self._raw_channel()
        return self.channel

    async def _exchange(self, channel: aiormq.abc.AbstractChannel, name: str, kind: str) -> None:
        if name not in self._exchanges:
            await channel.exchange_declare(name, exchange_type=kind, durable=True)
            self._exchanges.add(name)
            self.created_exchanges.add(name)

    async def declare(self, q: Queue) -> None:
        """The queue and its dead-letter queue (idempotent; remembered)."""
        if q.declared:
            return
        async with self._lock:
            if q.declared:
                return
            with mapped(f"declaring queue {q.amqp!r}"):
                ch = await self._channel()
                await self._exchange(ch, self.dlx, "direct")
                await ch.queue_declare(q.dlq, durable=True)
                await ch.queue_bind(q.dlq, self.dlx, routing_key=q.amqp)
                args = {"x-dead-letter-exchange": self.dlx,
                        "x-dead-letter-routing-key": q.amqp, **self._queue_arguments()}
                await ch.queue_declare(q.amqp, durable=True, arguments=args)
            q.declared = True

    async def route(self, q: Queue, delay_s: float) -> tuple[str, str]:
        """The exchange and routing key of a message for ``q`` delayed ``delay_s``
        (declaring the delay levels it passes through)."""
        if delay_s <= 0:
            return "", q.amqp
        n = ticks(delay_s)
        if n >= 1 << DELAY_LEVELS:
            raise PublishError(f"a delay of {delay_s} s is longer than the longest "
                               f"delay ({((1 << DELAY_LEVELS) - 1) * DELAY_TICK_S:.0f} s)")
        top = n.bit_length() - 1
        await self._declare_delays(q, top)
        return self.level_exchange(top), routing_key(n, q)

    async def _declare_delays(self, q: Queue, top: int) -> None:
        """Delay levels 0..``top`` of ``q``, their exchanges and the way back to ``q``."""
        if q.levels >= top and q.bound:
            return
        async with self._lock:
            with mapped(f"declaring delay levels of {q.amqp!r}"):
                await self._declare_levels(q, top)

    async def _declare_levels(self, q: Queue, top: int) -> None:
        """Under the declaration lock: see :meth:`_declare_delays`."""
        ch = await self._channel()
        await self._exchange(ch, self.handback, "topic")
        for k in range(self._exchange_levels + 1, top + 1):
            await self._exchange(ch, self.level_exchange(k), "topic")
            # Bit k clear: on to the level below, at once.
            await ch.exchange_bind(self._below(k), self.level_exchange(k),
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
            await ch.queue_bind(q.level(k), self.level_exchange(k),
                                routing_key="*." * (DELAY_LEVELS - 1 - k) + "1."
                                + "*." * k + q.amqp)
            q.levels = k
            q.created_levels = max(q.created_levels, k)
        if not q.bound:
            await ch.queue_bind(q.amqp, self.handback,
                                routing_key="*." * DELAY_LEVELS + q.amqp)
            q.bound = True

    async def delete_all(self, ch: aiormq.abc.AbstractChannel) -> int:
        """Delete every queue and exchange this topology ever declared (with their
        dead-letter and delay queues); how many."""
        deleted = 0
        for q in self.queues.values():  # deleting a missing queue is fine
            for k in range(q.created_levels, -1, -1):
                await ch.queue_delete(q.level(k))
            await ch.queue_delete(q.amqp)
            await ch.queue_delete(q.dlq)
            await ch.queue_delete(q.dlq_lock)
            deleted += 2 + q.created_levels + 1
        for name in sorted(self.created_exchanges, reverse=True):
            await ch.exchange_delete(name)
            deleted += 1
        return deleted

    def forget_created(self) -> None:
        """After :meth:`delete_all`: nothing declared any more."""
        self.created_exchanges.clear()
        self.forget_all()
        for q in self.queues.values():
            q.created_levels = -1
