"""Reading and removing single dead letters of a queue (its ``<ns>.<queue>.dlq``).

AMQP has no "delete this message" and no "read without taking": a dead-letter
queue is read with ``basic.get`` without auto-ack on a private channel. The
messages taken stay unacked (invisible to every other reader) until they are
settled:

* **listing** (:func:`read`): the oldest messages are taken, then all handed back
  at once (``basic.nack`` with ``multiple`` and ``requeue``);
* **removing** (:func:`remove`): messages are taken, oldest first, until every
  key asked for is found (or the queue is empty); the chosen ones are acked, the
  others handed back as above; the channel is then closed, whose ``close-ok``
  says RabbitMQ has applied the acks before the count is returned.

**Order.** The dead-letter queue is a classic queue, and RabbitMQ puts a message
handed back (nack with requeue) at its original place in a classic queue: the
letters left keep their order. Republishing them instead would move them behind
letters dead-lettered meanwhile and, after a crash between the publish and the
ack, leave two copies; handing back does neither. A message handed back is
flagged ``redelivered`` (taskloom does not read that flag in a dead-letter queue).

**Replay never loses.** The runtime's replay publishes the new attempt and
awaits its confirm before it asks to remove the dead letter (see
``runtime.ops.verbs``): a crash in between leaves the dead letter in place, and
replaying again publishes the same task id again (a duplicate, visible by its
id), never nothing.

**Concurrent readers.** While a walk holds messages, another reader of the same
dead-letter queue does not see them. So every walk of taskloom (list, replay,
purge, retry, ``taskloom dlq``, the dashboard) first takes the queue's
dead-letter lock: ``<ns>.<queue>.dlq.lock``, a transient single-active-consumer
queue holding one token message. Each walker consumes it; RabbitMQ delivers the
token to one active consumer at a time, and hands it to the next one (a push,
no polling) when the holder's channel closes, which a crash of the holder or of
its connection does too. A walker waits at most :data:`LOCK_WAIT_S` for it.

Limits: a reader that does not take the lock (the management UI's "Get
messages", another AMQP client) hides the messages it holds from a walk for that
time: a removal then misses them (the replay's count of removed letters is
lower than the matched one, and replaying again would publish those a second
time). A walk holds every message it takes until it settles them, so it is
bounded by the consumer's memory and RabbitMQ's ``consumer_timeout``; it reads
one message per round trip: on a local RabbitMQ 3.10 (a loaded 2-core machine)
about 2,400 letters a second, and 800 once a walk has handed them back (a
5,000-letter queue: 2 to 6 s a walk). A replay is one walk to list, then one
per 500 letters replayed, each stopping at the last letter it looks for. A
walker waits at most :data:`LOCK_WAIT_S` for another, so queues beyond some
50,000 letters need the broker's own tools (or a purge). Pushing with
``basic.consume`` would be faster, but RabbitMQ numbers the deliveries of a
get and of a consumer on one channel out of queue order, and a consumer alone
cannot tell the end of the queue. Messages dead-lettered while a walk runs may
or may not be part of it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, cast

import aiormq
import aiormq.abc
import aiormq.exceptions as aex
import anyio
import msgspec
import structlog
from pamqp.commands import Basic

from brokers.amqp.errors import mapped
from brokers.amqp.headers import (
    H_DEAD_AT,
    H_DELIVERED,
    H_REASON,
    bounded,
    count_header,
    user_headers,
)
from brokers.amqp.topology import Queue
from brokers.base import BrokerError, ConnectionLost, DeadLetter, Envelope

if TYPE_CHECKING:
    from brokers.amqp.broker import AmqpBroker

__all__ = ["LOCK_WAIT_S", "DeadLetterEntry", "DeadLetterLockTimeout", "read", "remove"]

log = structlog.get_logger("brokers.amqp")

#: Longest wait for another walker of the same dead-letter queue to finish.
LOCK_WAIT_S: Final = 60.0
_LOCK_ARGUMENTS: Final[dict[str, Any]] = {
    "x-single-active-consumer": True, "x-max-length": 1, "x-overflow": "drop-head"}


class DeadLetterLockTimeout(BrokerError):
    """Another walker held the dead letters of the queue for too long."""


class DeadLetterEntry(msgspec.Struct, frozen=True):
    """A dead letter, the key that removes it, and when it was dead-lettered (epoch
    ms; None when unknown). Identical copies share a key: removing a key once
    removes one of them."""

    key: str
    letter: DeadLetter
    at_ms: int | None = None


def _at_ms(q: Queue, table: Mapping[str, Any]) -> int | None:
    stamp = table.get(H_DEAD_AT)
    if type(stamp) is int and stamp > 0:
        return stamp
    for death in table.get("x-death") or []:
        if isinstance(death, dict) and death.get("queue") == q.amqp:
            when = death.get("time")
            if isinstance(when, dt.datetime):
                if when.tzinfo is None:
                    when = when.replace(tzinfo=dt.UTC)
                return int(when.timestamp() * 1000)
            if type(when) is int:
                return when * 1000
    return None


def letter_of(q: Queue, message: aiormq.abc.DeliveredMessage,
              delivery_limit: int | None) -> DeadLetter:
    """The :class:`DeadLetter` of a message of ``q``'s dead-letter queue."""
    props = message.header.properties
    table: Mapping[str, Any] = props.headers or {}
    envelope = Envelope(id=props.message_id or "", queue=q.name, body=message.body,
                        headers=user_headers(table), priority=props.priority or 0)
    delivered = count_header(table, H_DELIVERED, props.message_id) or 0
    reason = table.get(H_REASON)
    if reason is not None:  # dead-lettered by taskloom: the count is exact
        return DeadLetter(envelope=envelope, reason=bounded(reason), delivery_count=delivered)
    # Dead-lettered by RabbitMQ: the newest x-death entry of the queue says why.
    deaths = table.get("x-death") or []
    why = next((d.get("reason") for d in deaths
                if isinstance(d, dict) and d.get("queue") == q.amqp), None)
    why = bounded(why or table.get("x-first-death-reason") or "unknown")
    if why == "delivery_limit" and delivery_limit is not None:
        delivered += delivery_limit + 1
    elif why == "rejected":
        delivered += 1
    return DeadLetter(envelope=envelope, reason=why, delivery_count=delivered)


def _entry(q: Queue, message: aiormq.abc.DeliveredMessage,
           delivery_limit: int | None) -> DeadLetterEntry:
    letter = letter_of(q, message, delivery_limit)
    at_ms = _at_ms(q, message.header.properties.headers or {})
    digest = hashlib.blake2b(digest_size=8)
    for part in (letter.envelope.id.encode(), message.body, letter.reason.encode(),
                 str(at_ms).encode(), str(letter.delivery_count).encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return DeadLetterEntry(f"{letter.envelope.id}#{digest.hexdigest()}", letter, at_ms)


@asynccontextmanager
async def _locked(broker: AmqpBroker, q: Queue) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """Hold ``q``'s dead-letter lock; yields a new channel for the walk, closed (its
    unsettled messages handed back) before the lock is let go."""
    lock = await broker._raw_channel()
    try:
        token: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_token(_: aiormq.abc.DeliveredMessage) -> None:
            if not token.done():
                token.set_result(None)

        with mapped(f"locking the dead letters of {q.name!r}"):
            ok = await lock.queue_declare(q.dlq_lock, arguments=_LOCK_ARGUMENTS)
            if ok is not None and not ok.message_count:  # the first walker (or a restart)
                await lock.basic_publish(b"", routing_key=q.dlq_lock)
            await lock.basic_qos(prefetch_count=1)
            await lock.basic_consume(q.dlq_lock, on_token)
        closing = lock.closing  # an observer: cancelling it leaves the channel alone
        try:
            await asyncio.wait({token, closing}, timeout=LOCK_WAIT_S,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if closing.done() and not closing.cancelled():
                closing.exception()  # read, so that asyncio does not log it
            closing.cancel()
        if not token.done():
            if lock.is_closed:
                raise ConnectionLost(f"the connection to RabbitMQ was lost while waiting to "
                                     f"read the dead letters of queue {q.name!r}; nothing "
                                     "was changed, try again")
            raise DeadLetterLockTimeout(
                f"the dead letters of queue {q.name!r} were held by another reader for "
                f"{LOCK_WAIT_S:.0f} s (a replay, purge or listing of a large dead-letter "
                f"queue, through {q.dlq_lock!r}); try again when it is done")
        walk = await broker._raw_channel()
        try:
            yield walk
        finally:
            await _close(walk)
    finally:
        await _close(lock)


async def _close(channel: aiormq.abc.AbstractChannel) -> None:
    with anyio.CancelScope(shield=True):
        if not channel.is_closed:
            try:
                await channel.close()
            except Exception as e:
                log.debug("amqp.dlq_channel_close_failed", error=repr(e))


async def _take(ch: aiormq.abc.AbstractChannel, q: Queue,
                enough: Callable[[aiormq.abc.DeliveredMessage, int], bool]
                ) -> list[aiormq.abc.DeliveredMessage]:
    """Messages of the dead-letter queue, oldest first, unacked, until ``enough``
    (given the last one and how many were taken) says so or none is left; [] when
    the queue does not exist."""
    taken: list[aiormq.abc.DeliveredMessage] = []
    try:
        while True:
            message = await ch.basic_get(q.dlq, no_ack=False)
            if not isinstance(message.delivery, Basic.GetOk):
                return taken
            taken.append(message)
            if enough(message, len(taken)) or not message.delivery.message_count:
                return taken
    except aex.ChannelNotFoundEntity:
        return []


def _tag(message: aiormq.abc.DeliveredMessage) -> int:
    return cast(Basic.GetOk, message.delivery).delivery_tag or 0


async def read(broker: AmqpBroker, q: Queue, limit: int | None) -> list[DeadLetterEntry]:
    """The oldest ``limit`` (None: all) dead letters of ``q``, left in place."""
    if limit is not None and limit <= 0:
        return []
    with mapped(f"reading dead letters of {q.name!r}"):
        async with _locked(broker, q) as ch:
            taken = await _take(ch, q, lambda _, n: limit is not None and n >= limit)
            if taken and not ch.is_closed:
                await cast(aiormq.Channel, ch).basic_nack(_tag(taken[-1]), multiple=True,
                                                          requeue=True)
    return [_entry(q, m, broker.delivery_limit) for m in taken]


async def remove(broker: AmqpBroker, q: Queue, keys: Sequence[str]) -> int:
    """Remove the dead letters of ``q`` with these keys (a key given n times removes
    up to n identical copies); the others stay in order. How many were removed:
    fewer than asked when some are gone already (removing is idempotent)."""
    wanted = Counter(keys)
    if not wanted:
        return 0
    missing = sum(wanted.values())
    chosen: list[int] = []

    def pick(message: aiormq.abc.DeliveredMessage, _: int) -> bool:
        nonlocal missing
        key = _entry(q, message, broker.delivery_limit).key
        if wanted[key] > 0:
            wanted[key] -= 1
            missing -= 1
            chosen.append(_tag(message))
        return missing == 0

    with mapped(f"removing dead letters of {q.name!r}"):
        async with _locked(broker, q) as ch:
            taken = await _take(ch, q, pick)
            channel = cast(aiormq.Channel, ch)
            for tag in chosen:
                await channel.basic_ack(tag)
            settled = set(chosen)
            kept = [t for t in map(_tag, taken) if t not in settled]
            if kept:  # the chosen are settled: "multiple" hands back only the others
                await channel.basic_nack(kept[-1], multiple=True, requeue=True)
            await channel.close()  # its close-ok: RabbitMQ has applied the acks
    log.info("amqp.dead_letters_removed", queue=q.name, removed=len(chosen),
             asked=len(keys))
    return len(chosen)
