"""Deliveries of the Redis broker and the batches their settlements travel in.

* **Settling** (ack / nack / dead-letter) queues the settlement and returns; the
  consumer sends the queue's settlements as one script call per queue (``XACK`` +
  ``XDEL`` of all acked ids; requeues and dead-letters atomically with their
  ``XACK``: ``lua/settle.lua``), in the same round trip as its next fetch and
  settlements-first, or on its own within ``batch_wait_s`` under load (at once
  when idle). A crash in that window redelivers the message, as a crash before
  settling would. ``stats``, ``purge``, ``dead_letters`` and ``aclose`` flush
  first (read your own writes). Unacked entries are never trimmed.
"""

from __future__ import annotations

import math
from typing import Protocol

import anyio

from brokers.base import Envelope, SettleOnce
from brokers.redis.keys import Queue, Stream
from brokers.redis.scripts import SETTLE, Call

__all__ = ["Batch", "RedisDelivery", "Settler"]


class Settler(Protocol):
    """What a delivery needs of its consumer (:class:`~brokers.redis.consumer.RedisConsumer`)."""

    def _submit(self, delivery: RedisDelivery, verb: str, arg: str) -> None: ...

    async def _extend(self, delivery: RedisDelivery) -> None: ...


class RedisDelivery(SettleOnce):
    """A delivery of the Redis broker: one pending stream entry of its consumer."""

    __slots__ = ("_consumer", "_id", "_settled", "_size", "_stream", "delivery_count",
                 "envelope")

    def __init__(self, consumer: Settler, stream: Stream, entry_id: bytes,
                 envelope: Envelope, delivery_count: int, size: int = 0) -> None:
        self._consumer = consumer
        self._stream = stream
        self._id = entry_id
        self._size = size
        self._settled: str | None = None
        self.envelope = envelope
        self.delivery_count = delivery_count

    # Settling queues the settlement for the consumer's next batch (sent within
    # ``batch_wait_s``, and always before its next fetch) and returns: a crash in
    # that window redelivers the message, as a crash before settling would.

    async def ack(self) -> None:
        if self._settle("ack"):
            self._consumer._submit(self, "a", "")

    async def nack(self, *, delay_s: float = 0.0) -> None:
        if self._settle("nack"):
            delay_ms = math.ceil(delay_s * 1000) if delay_s > 0 else 0
            self._consumer._submit(self, "n", str(delay_ms))

    async def dead_letter(self, reason: str) -> None:
        if self._settle("dead_letter"):
            self._consumer._submit(self, "d", reason)

    async def extend(self) -> None:
        """Renew the lease now (the consumer also does it every ``lease_s / 3``)."""
        if self._settled is None:
            await self._consumer._extend(self)

    def __repr__(self) -> str:
        return (f"RedisDelivery(id={self.envelope.id!r}, queue={self._stream.queue.name!r}, "
                f"entry={self._id.decode()!r}, delivery_count={self.delivery_count})")


class Batch:
    """Settlements waiting for one flush: per queue, acked ids (prefixed with
    their band digit) and other settlements (5 script arguments each)."""

    __slots__ = ("delays", "full", "ops", "retried", "size")

    def __init__(self) -> None:
        self.size = 0
        self.full = anyio.Event()
        self.ops: dict[Queue, tuple[list[bytes], list[str | bytes | int]]] = {}
        self.delays = False
        self.retried = False  # holds settlements whose first send may have been applied

    def merge(self, other: Batch) -> None:
        """Take ``other``'s settlements (a batch that could not be sent)."""
        for q, (acks, rest) in other.ops.items():
            ops = self.ops.get(q)
            if ops is None:
                ops = self.ops[q] = ([], [])
            ops[0].extend(acks)
            ops[1].extend(rest)
        self.size += other.size
        self.delays = self.delays or other.delays
        self.retried = True

    def ids(self) -> set[bytes]:
        """The entry ids this batch settles."""
        out: set[bytes] = set()
        for acks, rest in self.ops.values():
            out.update(a[1:] for a in acks)
            out.update(i for i in rest[2::5] if isinstance(i, bytes))
        return out

    def calls(self, group: str) -> list[Call]:
        return [(SETTLE, [*q.streams, q.delayed, q.dead], [group, b",".join(acks), *other])
                for q, (acks, other) in self.ops.items()]
