"""The consumer watchdog: noticing a dead link.

The heartbeat defaults to 10 s (RabbitMQ drops a silent client after ~20 s,
aiormq a silent server after ~33 s). Frames can also be lost while the link
looks alive (a partition that drops bytes, then heals): lost acks leave RabbitMQ
believing the consumer is full, lost deliveries leave the consumer waiting, and
heartbeats then flow again. Each consumer runs a watchdog (``watchdog_s``,
default 5 s): when it had room for more and received nothing for a period, it
asks RabbitMQ how many messages are ready (a passive declare on a channel of its
own). No answer within a period, or ready messages at two checks in a row with
still nothing received, and it logs ``amqp.consumer_stalled`` (one line per
detection) and closes the connection (:meth:`AmqpBroker._reconnect`); aio-pika
reconnects and the consumers subscribe again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiormq.abc
import aiormq.exceptions as aex
import anyio
import structlog
from pamqp.commands import Basic

if TYPE_CHECKING:
    from brokers.amqp.consumer import AmqpConsumer

__all__ = ["watch"]

log = structlog.get_logger("brokers.amqp")


async def watch(consumer: AmqpConsumer) -> None:
    """Notice a consumer that stopped receiving (see ``watchdog_s``) and
    re-establish it by reconnecting. Costs nothing while deliveries flow or
    the prefetch is used up; one passive declare per queue and period while
    idle."""
    broker = consumer._broker
    period = broker.options.watchdog_s
    if not period:
        return
    queues = [q.amqp for q in consumer._queues]
    seen, strikes = consumer._received, 0
    while True:
        await anyio.sleep(period)
        if consumer._closed:
            return
        if consumer._received != seen or not consumer._has_credit():
            seen, strikes = consumer._received, 0
            continue
        transport = broker._conn.transport if broker._conn else None
        if transport is None or transport.connection.is_closed:
            strikes = 0  # reconnecting already
            continue
        connection = transport.connection
        try:
            ready = await _probe(consumer, connection, timeout=period)
        except TimeoutError:
            await broker._reconnect(
                connection, f"RabbitMQ did not answer the consumer's watchdog within "
                f"{period:g} s (a network partition or a dead link the heartbeat has "
                "not noticed yet)", queues=queues)
            seen, strikes = consumer._received, 0
            continue
        except Exception as e:  # the probe's own failure is not a stall
            log.debug("amqp.watchdog_probe_failed", error=repr(e))
            strikes = 0
            continue
        if consumer._received != seen or not ready:
            seen, strikes = consumer._received, 0
            continue
        strikes += 1
        if strikes >= 2:
            await broker._reconnect(
                connection, f"no delivery for {2 * period:g} s while {ready} messages are "
                "ready and the consumer has room (deliveries or acks lost on the way)",
                queues=queues)
            seen, strikes = consumer._received, 0


def _full_queues(consumer: AmqpConsumer) -> set[str]:
    """Queues at their own share of a split prefetch: they get nothing more."""
    if not consumer._per_queue:
        return set()
    tags = consumer._tags
    names = [tags[tag].name for m in consumer._buffer
             if isinstance(m.delivery, Basic.Deliver)
             and (tag := m.delivery.consumer_tag or "") in tags]
    return {q.name for q in consumer._queues
            if consumer._held.get(q.name, 0) + names.count(q.name) + consumer._pending_acks
            >= consumer._per_queue}


async def _probe(consumer: AmqpConsumer, connection: aiormq.abc.AbstractConnection, *,
                 timeout: float) -> int:
    """Messages ready in the consumer's queues, asked on a channel of its own;
    TimeoutError when RabbitMQ does not answer within ``timeout``."""
    ready = 0
    full = _full_queues(consumer)
    with anyio.fail_after(timeout):
        for q in consumer._queues:
            if q.name in full:
                continue
            channel = consumer._probe_channel
            if channel is None or channel.is_closed or channel.connection is not connection:
                channel = consumer._probe_channel = await connection.channel(
                    publisher_confirms=False)
            try:
                ok = await channel.queue_declare(q.amqp, passive=True)
            except aex.ChannelNotFoundEntity:
                continue  # deleted: the server cancels the consumer, _watch redeclares
            ready += ok.message_count or 0
    return ready
