"""Every use of aiormq's internals, in one place.

aiormq (under aio-pika) sends one frame per call: ``basic_publish`` writes each
message on its own and ``basic_ack`` each ack on its own, a system call each.
Batched publishing and merged acks write many frames at once instead, through
attributes of :class:`aiormq.Channel` that are not part of its abstract interface
(``aiormq.abc.AbstractChannel``) and that aiormq may change in any release:

* ``write_queue`` (frames on their way to the socket), for both;
* the confirm bookkeeping of a confirm channel (``delivery_tag``,
  ``confirmations``, ``message_id_delivery_tag``, under ``lock``, futures from
  ``create_future``) and ``max_content_size``, for batched publishing;
* ``consumers`` (the consumer tags subscribed on a channel);
* ``_get_frame`` and ``_on_deliver_frame`` (the channel's frame reader reading a
  delivery's content), for handing deliveries over without a task each
  (:func:`deliver_inline`).

Written against aiormq 7.2.4 (with aio-pika 10.2.1 and pamqp 4.0.1). The project
pins only ``aio-pika>=9.4``, which pulls aiormq in: :func:`can_batch`,
:func:`send_acks` and :func:`deliver_inline` check the attributes at run time and
fall back to aiormq's per-message calls when they are missing, and the AMQP tests (tests/amqp,
tests/contract, tests/faults/test_amqp_*) are what tells whether a new aiormq
still keeps the bookkeeping this module relies on.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import Any, Final

import aiormq
import structlog
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

__all__ = ["Acks", "Item", "ack_bytes", "can_batch", "deliver_inline", "send_acks",
           "send_batch", "subscribed"]

log = structlog.get_logger("brokers.amqp")


def subscribed(channel: aiormq.Channel) -> Collection[str]:
    """The consumer tags subscribed on ``channel``."""
    return channel.consumers.keys()


# -- deliveries without a task each ---------------------------------------------------

#: Where a channel's inline handlers are kept (consumer tag -> handler).
_INLINE: Final = "_taskloom_inline"
_INLINE_ATTRIBUTES: Final = ("_get_frame", "_on_deliver_frame", "consumers")


def deliver_inline(channel: aiormq.Channel, tag: str,
                   handler: Callable[[DeliveredMessage], None]) -> bool:
    """Hand the deliveries of consumer ``tag`` on ``channel`` to ``handler`` from the
    channel's frame reader, as they are read; False (nothing done) when this aiormq
    lacks the attributes used (then its consumer callback gets them, as usual).

    aiormq starts an asyncio task per delivery to run the consumer callback (a task
    object, its scheduling and two done callbacks per message). ``handler`` must be
    quick and must not block: it runs inside the reader, before the channel's next
    frame is read. A delivery for a tag without a handler takes aiormq's own path;
    one for a tag no longer subscribed (cancelled) is dropped, as aiormq does (its
    channel's close hands it back to the queue).
    """
    if not all(hasattr(channel, name) for name in _INLINE_ATTRIBUTES):
        return False  # pragma: no cover  # an aiormq without the attributes used
    handlers: dict[str, Callable[[DeliveredMessage], None]] | None = getattr(
        channel, _INLINE, None)
    if handlers is None:
        handlers = {}
        setattr(channel, _INLINE, handlers)
        # replaces the method on this channel only (an assignment mypy refuses)
        setattr(channel, "_on_deliver_frame",  # noqa: B010
                partial(_on_deliver_frame, channel, handlers))
    handlers[tag] = handler
    return True


async def _on_deliver_frame(channel: aiormq.Channel,
                            handlers: dict[str, Callable[[DeliveredMessage], None]],
                            frame: Basic.Deliver) -> None:
    """aiormq's ``Channel._on_deliver_frame``, calling an inline handler if there is one."""
    get_frame = channel._get_frame
    header = await get_frame()
    if not isinstance(header, ContentHeader):
        raise ValueError(f"unexpected frame {header!r} instead of a content header")
    size = header.body_size or 0
    parts: list[bytes] = []
    got = 0
    while got < size:
        content = await get_frame()
        if not isinstance(content, ContentBody):
            raise ValueError(f"unexpected frame {content!r} instead of a content body")
        parts.append(content.value)
        got += len(content.value)
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    message = DeliveredMessage(delivery=frame, header=header, body=body, channel=channel)
    tag = frame.consumer_tag or ""
    consumer = channel.consumers.get(tag)
    if consumer is None:
        return  # cancelled: the channel's close requeues it
    handler = handlers.get(tag)
    if handler is None:
        task = channel.create_task(consumer(message))
        task.add_done_callback(channel._on_consumer_done)
        return
    try:
        handler(message)
    except Exception as e:  # never let the channel's reader die
        log.error("amqp.delivery_handler_failed", consumer_tag=tag, error=repr(e),
                  note="the delivery stays unacked: RabbitMQ redelivers it when the "
                       "channel closes")


# -- merged acks ----------------------------------------------------------------------

class Acks:
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


#: A ``basic.ack`` method frame: frame type 1, channel, payload size 13, class 60,
#: method 80, delivery tag, the ``multiple`` bit; then the frame end octet.
_ACK_FRAME: Final = struct.Struct(">BHIHHQB")
_FRAME_END: Final = b"\xce"


def ack_bytes(channel_number: int, frames: Sequence[Basic.Ack]) -> bytes:
    """``frames`` on the wire, as pamqp marshals them, without its generic
    per-field encoding (this runs for every ack sent)."""
    pack = _ACK_FRAME.pack
    return b"".join(pack(1, channel_number, 13, 60, 80, f.delivery_tag or 0,
                         1 if f.multiple else 0) + _FRAME_END for f in frames)


async def send_acks(channel: aiormq.Channel, frames: list[Basic.Ack]) -> None:
    write_queue = getattr(channel, "write_queue", None)
    if write_queue is not None:  # all frames in one write (one syscall)
        await write_queue.put(ChannelFrame(payload=ack_bytes(channel.number, frames),
                                           should_close=False))
        return
    for frame in frames:  # pragma: no cover  # aiormq without a public write queue
        await channel.basic_ack(frame.delivery_tag or 0, multiple=frame.multiple, wait=False)


# -- batched publishing ---------------------------------------------------------------

#: One message to publish: exchange, routing key, body, properties.
Item = tuple[str, str, bytes, Basic.Properties]

#: Bytes of frames written at once by a batched publish.
_WRITE_BYTES: Final = 256 * 1024
_BATCH_ATTRIBUTES: Final = ("confirmations", "delivery_tag", "message_id_delivery_tag",
                            "write_queue", "max_content_size", "lock", "create_future")


def can_batch(channel: aiormq.Channel) -> bool:
    return channel.publisher_confirms and all(
        hasattr(channel, name) for name in _BATCH_ATTRIBUTES)


def _forget_message_id(channel: aiormq.Channel, message_id: str, tag: int,
                       _: asyncio.Future[Any]) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:
        channel.message_id_delivery_tag.pop(message_id)


async def send_batch(channel: aiormq.Channel, items: Sequence[Item]) -> list[asyncio.Future[Any]]:
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
