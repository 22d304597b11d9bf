"""The RabbitMQ broker (AMQP 0-9-1 through aio-pika); see :mod:`brokers.amqp.broker`."""

from brokers.amqp.broker import (
    DELAY_LEVELS,
    DELAY_TICK_S,
    H_DELIVERED,
    AmqpBroker,
    AmqpBrokerOptions,
    AmqpConsumer,
    AmqpDelivery,
    _Acks,
    _routing_key,
    _ticks,
)

__all__ = [
    "DELAY_LEVELS",
    "DELAY_TICK_S",
    "H_DELIVERED",
    "AmqpBroker",
    "AmqpBrokerOptions",
    "AmqpConsumer",
    "AmqpDelivery",
    "_Acks",
    "_routing_key",
    "_ticks",
]
