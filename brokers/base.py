"""The transport seam: what every broker implements and what the runtime may use.

Brokers move opaque bytes wrapped in an :class:`Envelope`; they never see a
``TaskMessage``. This module is the only thing ``runtime`` imports from
``brokers`` (besides ``brokers.from_url``).

The error tree is rooted here so brokers can subclass it::

    TaskloomError
    └── BrokerError
        ├── BrokerConnectionError
        │   ├── ConnectionFailed      could not open a connection
        │   └── ConnectionLost        dropped mid-operation (retryable)
        ├── PublishError              not confirmed / unroutable / rejected
        ├── QueueNotFound
        └── DeliveryAlreadySettled

The contract (each sentence has a test in ``tests/contract``):

1. ``publish`` returns only when the message is durable on the broker, else it
   raises ``PublishError`` (or a ``BrokerConnectionError``). ``publish_many`` is
   all-or-error: when it raises, any subset may have been stored (retrying with
   the same ids gives visible duplicates, never loss).
2. ``declare`` is idempotent; ``publish`` declares the queue implicitly.
3. At least once: a delivery not settled before its consumer closes or dies
   is delivered again with ``delivery_count + 1``.
4. Settling twice with the same verb is a no-op; with another verb it raises
   ``DeliveryAlreadySettled``. A broker may batch settlements and return
   before the server has them (Redis: within ``batch_wait_s``); a crash in
   that window redelivers the message, as a crash before settling would, and
   a broker always sees its own settlements (``stats``, ``aclose`` flush first).
5. ``nack(delay_s=d)`` and ``Envelope.delay_s`` make a message invisible for at
   least ``d`` seconds; it is never delivered early.
6. ``dead_letter(reason)`` moves the message to the queue's dead-letter store
   with the reason; it never returns to the queue by itself.
7. ``consume`` is cancellable; closing a consumer stops fetching first, then
   returns unsettled prefetched deliveries to the queue.
8. ``prefetch`` bounds the unsettled deliveries a consumer holds.
9. Among ready messages of one queue, a higher ``priority`` is delivered first
   where ``capabilities.max_priority > 0``; elsewhere priority is ignored.
10. Errors leave a broker only as the types of this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol, Self, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec

__all__ = [
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "ConfigError",
    "Capabilities",
    "ConnectionFailed",
    "ConnectionLost",
    "Consumer",
    "DeadLetter",
    "Delivery",
    "DeliveryAlreadySettled",
    "Envelope",
    "PublishError",
    "QueueNotFound",
    "QueueStats",
    "ReceiveIteration",
    "TaskloomError",
    "SettleOnce",
    "consumed_queues",
    "is_connection_failure",
    "redact_url",
]


class TaskloomError(Exception):
    """The root of every error taskloom raises on purpose."""


class ConfigError(TaskloomError, ValueError):
    """A setting, URL or option is not valid; the message names it and says what
    is accepted. Raised before anything is sent or connected."""


class BrokerError(TaskloomError):
    """A broker could not do what was asked."""


class BrokerConnectionError(BrokerError):
    """The connection to the broker is not usable."""


class ConnectionFailed(BrokerConnectionError):
    """A connection could not be opened: check the URL and that the server runs."""


class ConnectionLost(BrokerConnectionError):
    """The connection dropped mid-operation; the operation may be retried."""


#: What event loops say when a write reaches a transport that a reset closed
#: (uvloop: "unable to perform operation on <TCPTransport closed=True ...>; the
#: handler is closed"; asyncio's SSL transport says much the same).
_CLOSED_TRANSPORT_HINTS = ("unable to perform operation on", "handler is closed",
                           "transport is closed", "closed=true")


def is_connection_failure(error: BaseException,
                          client_errors: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether ``error`` means "the connection is not usable", whatever layer
    raised it: ``client_errors`` (the client library's own connection and timeout
    types), any ``OSError`` (resets, broken pipes, refused connections, socket
    timeouts, SSL errors), an end of stream mid-reply (``EOFError``, which covers
    ``asyncio.IncompleteReadError``), anyio's broken or closed stream errors, and
    the ``RuntimeError`` an event loop raises on a write to a transport a reset
    already closed. The one classification every store and broker maps from, so
    that a new kind of reset cannot crash a worker in one place and not another."""
    if client_errors and isinstance(error, client_errors):
        return True
    if isinstance(error, (OSError, EOFError, anyio.BrokenResourceError,
                          anyio.ClosedResourceError)):
        return True
    if type(error) is RuntimeError:
        text = str(error).lower()
        return any(hint in text for hint in _CLOSED_TRANSPORT_HINTS)
    return False


class PublishError(BrokerError):
    """The broker did not confirm a message: it is not known to be stored."""


class QueueNotFound(BrokerError):
    """The queue does not exist on the broker."""


class DeliveryAlreadySettled(BrokerError):
    """A delivery was settled once already with another verb."""


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What a broker stores and moves. The body is opaque bytes."""

    id: str
    queue: str
    body: bytes
    headers: dict[str, str] = {}
    priority: int = 0
    delay_s: float = 0.0


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a broker can do; the runtime consults this, never isinstance()."""

    max_priority: int = 0
    native_delay: bool = True
    max_message_bytes: int | None = None
    dead_letter: bool = True
    #: The broker redelivers a message whose consumer stops extending its lease
    #: within this many seconds (None: only when the consumer's connection dies).
    lease_s: float | None = None
    #: Deliveries held unacked longer than this are taken back by the broker
    #: (RabbitMQ's consumer_timeout). Task time limits must stay below it.
    consumer_timeout_s: float | None = None


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    """Depths of one queue."""

    ready: int = 0
    delayed: int = 0
    in_flight: int = 0
    dead: int = 0


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A dead-lettered message with why it was dead-lettered."""

    envelope: Envelope
    reason: str
    delivery_count: int = 0


@runtime_checkable
class Delivery(Protocol):
    """One received message, leased to its consumer until settled."""

    @property
    def envelope(self) -> Envelope: ...

    @property
    def delivery_count(self) -> int:
        """1 on first delivery; more means redelivered."""
        ...

    async def ack(self) -> None:
        """Done: remove the message for good."""
        ...

    async def nack(self, *, delay_s: float = 0.0) -> None:
        """Back to the queue, visible again after ``delay_s`` seconds."""
        ...

    async def dead_letter(self, reason: str) -> None:
        """Move to the dead-letter store with ``reason``; never redelivered."""
        ...

    async def extend(self) -> None:
        """Heartbeat: keep the lease of a long-running delivery."""
        ...


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class SettleOnce:
    """The settle-once rule every broker's ``Delivery`` keeps: the first
    settlement wins; the same verb again (or any verb after the broker released
    the delivery) is a no-op; another verb raises ``DeliveryAlreadySettled``."""

    _settled: str | None
    envelope: Envelope

    def _settle(self, verb: str) -> bool:
        """Claim the settlement for ``verb``; False when it is a no-op."""
        current = self._settled
        if current is None:
            self._settled = verb
            return True
        if current in (verb, "released"):
            return False
        raise DeliveryAlreadySettled(
            f"message {self.envelope.id} was already settled with {current}(); "
            f"it cannot also be settled with {verb}()"
        )


def consumed_queues(queues: Sequence[str], prefetch: int) -> list[str]:
    """``queues`` without repeats, after checking a ``consume()`` call's arguments."""
    if prefetch < 1:
        raise ConfigError(f"prefetch must be at least 1, got {prefetch}")
    if not queues:
        raise ConfigError("consume() needs at least one queue")
    return list(dict.fromkeys(queues))


class ReceiveIteration:
    """``async for delivery in consumer`` on top of ``receive()``."""

    async def receive(self) -> Delivery:
        raise NotImplementedError

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delivery:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class Consumer(Protocol):
    """A receive stream of deliveries from one or more queues."""

    async def receive(self) -> Delivery:
        """The next delivery; blocks until one is ready. Raises
        ``anyio.EndOfStream`` once the consumer is closed."""
        ...

    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def aclose(self) -> None:
        """Stop fetching, then hand unsettled deliveries back to the queue."""
        ...


class Broker(Protocol):
    """A transport. ``async with broker:`` connects and closes."""

    capabilities: Capabilities

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def declare(self, queue: str) -> None:
        """Create the queue (and its delay and dead-letter stores); idempotent."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Store one message durably; returns only once the broker confirmed it."""
        ...

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Store many messages in as few round trips as the broker allows."""
        ...

    def consume(
        self, queues: Sequence[str], *, prefetch: int
    ) -> AbstractAsyncContextManager[Consumer]:
        """Open a consumer of ``queues`` holding at most ``prefetch`` unsettled
        deliveries."""
        ...

    async def stats(self, queue: str) -> QueueStats: ...

    async def purge(self, queue: str) -> int:
        """Drop every ready and delayed message of ``queue``; returns how many."""
        ...

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        """The oldest dead-lettered messages of ``queue``, without removing them."""
        ...
