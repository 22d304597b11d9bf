"""The in-process broker: the embedded default, honouring the whole contract.

Leases, redelivery of unsettled deliveries when a consumer closes, delays,
priorities, prefetch and a dead-letter store all behave as on a real server, so
the worker's settlement path is exercised for real in unit tests. Nothing
survives the process: use Redis or RabbitMQ where tasks must outlive it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self

import anyio

from brokers.base import (
    Capabilities,
    DeadLetter,
    Envelope,
    QueueStats,
    ReceiveIteration,
    SettleOnce,
    consumed_queues,
)

__all__ = ["MemoryBroker"]

Clock = Callable[[], float]


class _Queue:
    __slots__ = ("dead", "delayed", "in_flight", "ready")

    def __init__(self) -> None:
        # (-priority, seq, envelope, deliveries so far)
        self.ready: list[tuple[int, int, Envelope, int]] = []
        # (due, seq, envelope, deliveries so far)
        self.delayed: list[tuple[float, int, Envelope, int]] = []
        self.dead: list[DeadLetter] = []
        self.in_flight = 0


class MemoryDelivery(SettleOnce):
    """A delivery of the memory broker."""

    __slots__ = ("_consumer", "_settled", "delivery_count", "envelope")

    def __init__(self, consumer: MemoryConsumer, envelope: Envelope, delivery_count: int) -> None:
        self._consumer = consumer
        self.envelope = envelope
        self.delivery_count = delivery_count
        self._settled: str | None = None

    async def ack(self) -> None:
        if self._settle("ack"):
            self._consumer._settled(self)

    async def nack(self, *, delay_s: float = 0.0) -> None:
        if self._settle("nack"):
            self._consumer._settled(self)
            self._consumer._broker._put(self.envelope, self.delivery_count, delay_s)

    async def dead_letter(self, reason: str) -> None:
        if self._settle("dead_letter"):
            self._consumer._settled(self)
            q = self._consumer._broker._queue(self.envelope.queue)
            q.dead.append(DeadLetter(envelope=self.envelope, reason=reason,
                                     delivery_count=self.delivery_count))

    async def extend(self) -> None:
        """Leases of the memory broker last as long as the consumer."""


class MemoryConsumer(ReceiveIteration):
    """A consumer of the memory broker; see :meth:`MemoryBroker.consume`."""

    def __init__(self, broker: MemoryBroker, queues: Sequence[str], prefetch: int) -> None:
        self._broker = broker
        self._queues = [broker._queue(name) for name in consumed_queues(queues, prefetch)]
        self._prefetch = prefetch
        self._unsettled: set[MemoryDelivery] = set()
        # one event per waiting receive(): a new message wakes one receiver, not all
        self._waiters: deque[anyio.Event] = deque()
        self._closed = False

    def _notify(self) -> None:
        while self._waiters:
            event = self._waiters.popleft()
            if not event.is_set():
                event.set()
                return

    def _settled(self, delivery: MemoryDelivery) -> None:
        self._unsettled.discard(delivery)
        self._broker._queue(delivery.envelope.queue).in_flight -= 1
        self._notify()

    def _take(self) -> MemoryDelivery | None:
        now = self._broker._clock()
        best: _Queue | None = None
        for q in self._queues:
            while q.delayed and q.delayed[0][0] <= now:
                _, seq, env, count = heapq.heappop(q.delayed)
                heapq.heappush(q.ready, (-env.priority, seq, env, count))
            if q.ready and (best is None or q.ready[0][:2] < best.ready[0][:2]):
                best = q
        if best is None:
            return None
        _, _, env, count = heapq.heappop(best.ready)
        best.in_flight += 1
        delivery = MemoryDelivery(self, env, count + 1)
        self._unsettled.add(delivery)
        return delivery

    def _next_due(self) -> float:
        dues = [q.delayed[0][0] for q in self._queues if q.delayed]
        return min(dues) - self._broker._clock() if dues else float("inf")

    async def receive(self) -> MemoryDelivery:
        while True:
            if self._closed:
                raise anyio.EndOfStream
            if len(self._unsettled) < self._prefetch:
                delivery = self._take()
                if delivery is not None:
                    return delivery
                wait = self._next_due()
            else:
                wait = float("inf")
            event = anyio.Event()
            self._waiters.append(event)
            try:
                if wait == float("inf"):
                    await event.wait()
                else:
                    with anyio.move_on_after(max(wait, 0.0)):
                        await event.wait()
            except BaseException:
                if event.is_set():
                    self._notify()  # pass the wake-up on: this receiver will not use it
                raise
            finally:
                if not event.is_set():
                    event.set()  # leaves the queue lazily: _notify skips set events

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._broker._consumers.discard(self)
        for event in self._waiters:
            event.set()
        self._waiters.clear()
        for delivery in list(self._unsettled):
            delivery._settled = "released"
            self._settled(delivery)
            self._broker._put(delivery.envelope, delivery.delivery_count, 0.0)


class MemoryBroker:
    """In-process broker. ``MemoryBroker.from_url("memory://")``."""

    capabilities = Capabilities(max_priority=9, native_delay=True, max_message_bytes=None)

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._consumers: set[MemoryConsumer] = set()
        self._seq = itertools.count()

    @classmethod
    def from_url(cls, url: str = "memory://", *, namespace: str = "") -> MemoryBroker:
        """Every memory broker is its own namespace; ``namespace`` is accepted
        for symmetry with the other brokers."""
        return cls()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    def _put(self, envelope: Envelope, deliveries: int, delay_s: float) -> None:
        q = self._queue(envelope.queue)
        seq = next(self._seq)
        if delay_s > 0:
            heapq.heappush(q.delayed, (self._clock() + delay_s, seq, envelope, deliveries))
        else:
            heapq.heappush(q.ready, (-envelope.priority, seq, envelope, deliveries))
        for consumer in self._consumers:
            consumer._notify()

    async def declare(self, queue: str) -> None:
        self._queue(queue)

    async def publish(self, envelope: Envelope) -> None:
        self._put(envelope, 0, envelope.delay_s)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            self._put(envelope, 0, envelope.delay_s)

    @asynccontextmanager
    async def consume(
        self, queues: Sequence[str], *, prefetch: int
    ) -> AsyncIterator[MemoryConsumer]:
        consumer = MemoryConsumer(self, queues, prefetch)
        self._consumers.add(consumer)
        try:
            yield consumer
        finally:
            await consumer.aclose()

    async def stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        return QueueStats(ready=len(q.ready), delayed=len(q.delayed),
                          in_flight=q.in_flight, dead=len(q.dead))

    async def purge(self, queue: str) -> int:
        q = self._queue(queue)
        n = len(q.ready) + len(q.delayed)
        q.ready.clear()
        q.delayed.clear()
        return n

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        return list(self._queue(queue).dead[:limit])

    def __repr__(self) -> str:
        return f"MemoryBroker(queues={sorted(self._queues)})"

