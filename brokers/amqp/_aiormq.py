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
* ``consumers`` (the consumer tags subscribed on a channel).

Written against aiormq 7.2.4 (with aio-pika 10.2.1 and pamqp 4.0.1). The project
pins only ``aio-pika>=9.4``, which pulls aiormq in: :func:`can_batch` and
:func:`send_acks` check the attributes at run time and fall back to aiormq's
per-message calls when they are missing, and the AMQP tests (tests/amqp,
tests/contract, tests/faults/test_amqp_*) are what tells whether a new aiormq
still keeps the bookkeeping this module relies on.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Collection, Sequence
from functools import partial
from typing import Any, Final

import aiormq
from aiormq.abc import ChannelFrame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

__all__ = ["Acks", "Item", "can_batch", "send_acks", "send_batch", "subscribed"]


def subscribed(channel: aiormq.Channel) -> Collection[str]:
    """The consumer tags subscribed on ``channel``."""
    return channel.consumers.keys()


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


async def send_acks(channel: aiormq.Channel, frames: list[Basic.Ack]) -> None:
    write_queue = getattr(channel, "write_queue", None)
    if write_queue is not None:  # all frames in one write (one syscall)
        await write_queue.put(ChannelFrame.marshall(channel_number=channel.number,
                                                    frames=frames))
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
