"""The RabbitMQ broker (AMQP 0-9-1 through aio-pika): confirms, late ack, TTL-cascade delays.

``AmqpBroker.from_url("amqp://user:pass@host:5672/vhost?queue_type=quorum")``.
Every queue lives in the URL's vhost under the namespace prefix, with a
dead-letter queue and, on first use, the delay levels of a "binary cascade" of
TTL queues: a delay never holds a message in a worker. Messages are published
persistent and confirmed, deliveries are acked late (merged into few frames),
nacks and dead letters are confirmed copies followed by an ack, and a consumer
re-subscribes by itself after a reconnect or when its watchdog finds it stalled.

Where each part lives (each module's docstring holds its design notes):

* :mod:`~brokers.amqp.options`: :class:`AmqpBrokerOptions` and the URL;
* :mod:`~brokers.amqp.topology`: the layout of names, the declarations and the
  delay levels;
* :mod:`~brokers.amqp.broker`: :class:`AmqpBroker` (connection, publishing,
  stats, purge, dead letters);
* :mod:`~brokers.amqp.consumer`: :class:`AmqpConsumer` and
  :class:`AmqpDelivery` (prefetch, merged acks, nack, re-subscription, closing);
* :mod:`~brokers.amqp.deadletters`: listing and removing single dead letters
  (a lock per dead-letter queue; the others stay in order);
* :mod:`~brokers.amqp.watchdog`: noticing a consumer gone silent on a dead link;
* :mod:`~brokers.amqp.headers`: the delivery count and user headers, not trusted;
* :mod:`~brokers.amqp.errors`: errors leave only as :mod:`brokers.base` types;
* :mod:`~brokers.amqp._aiormq`: every use of aiormq's internals (batched
  publishing with confirms, merged acks), written against one aiormq version.
"""

from brokers.amqp.broker import AmqpBroker
from brokers.amqp.consumer import AmqpConsumer, AmqpDelivery
from brokers.amqp.headers import H_DELIVERED, H_REASON
from brokers.amqp.options import AmqpBrokerOptions
from brokers.amqp.topology import DELAY_LEVELS, DELAY_TICK_S

__all__ = [
    "DELAY_LEVELS",
    "DELAY_TICK_S",
    "H_DELIVERED",
    "H_REASON",
    "AmqpBroker",
    "AmqpBrokerOptions",
    "AmqpConsumer",
    "AmqpDelivery",
]
