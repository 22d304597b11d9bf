"""Transports for taskloom: the broker protocol and its implementations.

``import brokers`` is cheap: the Redis and AMQP implementations (and their client
libraries) are imported only when :func:`from_url` is asked for them.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from brokers.base import (
    Broker,
    BrokerConnectionError,
    BrokerError,
    Capabilities,
    ConnectionFailed,
    ConnectionLost,
    Consumer,
    DeadLetter,
    Delivery,
    DeliveryAlreadySettled,
    Envelope,
    PublishError,
    QueueNotFound,
    QueueStats,
    TaskloomError,
)

__all__ = [
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
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
    "TaskloomError",
    "UnsupportedURL",
    "from_url",
]

#: scheme -> (module, class); each class has ``from_url(url, namespace=...)``.
_SCHEMES: dict[str, tuple[str, str]] = {
    "memory": ("brokers.memory", "MemoryBroker"),
    "redis": ("brokers.redis", "RedisBroker"),
    "rediss": ("brokers.redis", "RedisBroker"),
    "unix": ("brokers.redis", "RedisBroker"),
    "amqp": ("brokers.amqp", "AmqpBroker"),
    "amqps": ("brokers.amqp", "AmqpBroker"),
}


class UnsupportedURL(BrokerError, ValueError):
    """A broker URL whose scheme no broker handles."""


def from_url(url: str, *, namespace: str = "") -> Broker:
    """The broker for ``url``: ``memory://``, ``redis://…`` or ``amqp://…``.

    ``namespace`` prefixes every queue and key the broker touches, so that
    several applications (or tests) share one server without meeting.
    """
    scheme = urlsplit(url).scheme.lower()
    try:
        module_name, class_name = _SCHEMES[scheme]
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise UnsupportedURL(
            f"no broker handles the URL scheme {scheme!r} in {url!r}; use one of {known}"
        ) from None
    cls = getattr(importlib.import_module(module_name), class_name)
    broker: Broker = cls.from_url(url, namespace=namespace)
    return broker
