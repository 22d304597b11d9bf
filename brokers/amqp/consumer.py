"""Consuming from RabbitMQ: the consumer, its deliveries, and their settlement.

* **Consuming**: one channel per consumer, ``basic.qos`` prefetch, manual ack.
  Deliveries are pushed by the broker into a local buffer that ``prefetch``
  bounds, each handed to one waiting receiver, straight from the channel's frame
  reader (no asyncio task per delivery: :func:`~brokers.amqp._aiormq.deliver_inline`).
  ``basic.ack`` has no reply, so ``ack()`` only records the ack: they are sent
  merged (one ``multiple`` ack for a settled run of delivery tags, in one socket
  write: :class:`~brokers.amqp._aiormq.Acks`) once a quarter of the prefetch is
  pending, as soon as the prefetch is used up, and at most 2 ms later; closing
  the consumer sends them first.
* **Reconnecting**: the connection is aio-pika's robust one. After a reconnect
  each consumer subscribes again (also after the server cancelled it, e.g. a
  deleted queue, which it declares again); deliveries of the dead channel are
  dropped from the buffer, and settling one of them (a stale delivery tag) is
  logged, not raised: RabbitMQ redelivers the message. A consumer that stops
  receiving while the link looks alive is noticed by its watchdog
  (:mod:`brokers.amqp.watchdog`).
* **Nack and delivery count**: ``nack()`` publishes a copy (confirmed) carrying
  the delivery count in a header, to the back of the queue or through the delay
  cascade, then acks. Quorum queues count the deliveries of a message
  (``x-delivery-count``); classic queues only flag a redelivery, which counts as
  one more. So the ``delivery_limit`` of quorum queues counts deliveries that
  ended without settlement (a crashed or stopped worker, a lost connection), not
  nacks: retries are the runtime's to count.
* **Dead letters**: ``dead_letter(reason)`` publishes a copy to the dead-letter
  queue (confirmed), then acks.
* **Closing** a consumer cancels its subscriptions (stop fetching), sends the
  acks made so far and closes its channel, which returns every other unsettled
  delivery to its queue.

Limits: ``stats().in_flight`` counts the deliveries held by this process's
consumers (AMQP does not tell unacked counts without the management plugin).
On quorum queues deliveries handed back by a closing consumer show in ``ready``
a few milliseconds after ``aclose()`` returned (Raft applies them).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

import aiormq
import aiormq.abc
import aiormq.exceptions as aex
import anyio
import anyio.abc
import msgspec
import structlog
from aio_pika.abc import AbstractRobustChannel
from pamqp.commands import Basic

from brokers.amqp._aiormq import Acks, deliver_inline, send_acks, subscribed
from brokers.amqp.errors import mapped
from brokers.amqp.headers import H_DELIVERED, count_header, user_headers
from brokers.amqp.watchdog import watch
from brokers.base import Envelope, ReceiveIteration, SettleOnce, consumed_queues

if TYPE_CHECKING:
    from brokers.amqp.broker import AmqpBroker

__all__ = ["AmqpConsumer", "AmqpDelivery", "Consuming"]

log = structlog.get_logger("brokers.amqp")

#: Longest time an ack waits to be sent with others (when the prefetch is not used up).
_ACK_DELAY_S: Final = 0.002
#: Longest time closing a consumer waits for RabbitMQ (the server may be gone).
CLOSE_TIMEOUT_S: Final = 10.0
_STALE = (aex.ChannelInvalidStateError, aex.AMQPError, ConnectionError)


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
        self._acks: dict[int, Acks] = {}
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
        with mapped("opening a consumer"):
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
            if not self._closed and tag not in subscribed(underlay):
                deliver_inline(underlay, tag, self._on_delivered)
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
                with mapped("subscribing again"):
                    await self._subscribe()
                log.info("amqp.consumer_resubscribed", queues=[q.amqp for q in self._queues])
            except Exception as e:  # never let the consumer's task group crash
                log.warning("amqp.resubscribe_failed", error=str(e), retry_in_s=1.0)
                await anyio.sleep(1.0)
                self._resubscribe.set()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        """aiormq's consumer callback (a task per delivery), used only where
        :func:`~brokers.amqp._aiormq.deliver_inline` is not."""
        self._on_delivered(message)

    def _on_delivered(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._received += 1
        self._handoff(message)

    def _has_credit(self) -> bool:
        """RabbitMQ may send more: fewer deliveries held, buffered or awaiting their
        ack than the prefetch allows."""
        return self._unsettled + len(self._buffer) + self._pending_acks < self._credit

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
            acks = self._acks[id(channel)] = Acks(channel)
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
        prefetch is used up, and at most ``_ACK_DELAY_S`` after the first one.

        The delay is a plain loop timer, not a cancel scope: this runs for every
        ack when deliveries come one at a time (``run()``), where a timed-out
        cancel scope per ack was a tenth of the worker's time."""
        loop = asyncio.get_running_loop()
        nudge = self._ack_nudge
        while True:
            await self._ack_wanted.wait()
            if not self._acks_due():
                # woken by a due batch (``_ack`` sets it then) or by the timer
                nudge.clear()
                timer = loop.call_later(_ACK_DELAY_S, nudge.set)
                try:
                    await nudge.wait()
                finally:
                    timer.cancel()
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
                await send_acks(channel, acks.frames())
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
            count = (count_header(table, H_DELIVERED, props.message_id) or 0) + 1
            server = count_header(table, "x-delivery-count", props.message_id)
            if server is not None:
                count += server
            elif deliver.redelivered:
                count += 1
            headers = user_headers(table)
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
            with anyio.move_on_after(CLOSE_TIMEOUT_S):
                await self._close_channel(channel)

    async def _close_channel(self, channel: AbstractRobustChannel) -> None:
        try:
            if not channel.is_closed:
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                for tag in self._tags:
                    if tag in subscribed(underlay):
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


class Consuming:
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
            tg.start_soon(watch, consumer)
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


