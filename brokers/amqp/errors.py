"""Errors leave the AMQP broker only as :mod:`brokers.base` types.

What counts as "the connection is not usable" is decided by
:func:`brokers.base.is_connection_failure`, the one classification of every
transport, given aiormq's and aio-pika's own connection error types.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import aiormq.exceptions as aex

from brokers.base import (
    BrokerError,
    ConnectionLost,
    PublishError,
    QueueNotFound,
    is_connection_failure,
)

__all__ = ["CONNECTION_ERRORS", "mapped"]

#: aiormq's and aio-pika's "the connection is not usable" types. aio-pika and
#: aiormq also say it with a plain ``RuntimeError`` ("Connection is not ready",
#: "No active transport for connection", "<Connection> closed", "Channel closed"),
#: so every ``RuntimeError`` they raise counts as one, as it always did here.
CONNECTION_ERRORS: Final[tuple[type[BaseException], ...]] = (
    aex.ChannelInvalidStateError, aex.AMQPConnectionError, aex.ChannelClosed, RuntimeError)


@contextmanager
def mapped(what: str, *, publish: bool = False) -> Iterator[None]:
    """Let errors leave only as ``brokers.base`` types (httpx's map_exceptions)."""
    try:
        yield
    except BrokerError:
        raise
    except aex.PublishError as e:  # a basic.return: mandatory and routed nowhere
        raise PublishError(f"{what}: RabbitMQ could not route the message to any queue "
                           "(was the queue deleted?); it was not stored") from e
    except aex.DeliveryError as e:  # a basic.nack
        raise PublishError(f"{what}: RabbitMQ refused the message (nack: a queue at its "
                           "length limit, or an internal error); it was not stored") from e
    except aex.ChannelNotFoundEntity as e:
        cls = PublishError if publish else QueueNotFound
        raise cls(f"{what}: {e}") from e
    except aex.ChannelPreconditionFailed as e:
        raise BrokerError(f"{what}: {e}; a queue or exchange of that name exists with other "
                          "arguments (another queue_type, max_priority or delivery_limit?): "
                          "use the same options everywhere, or delete it") from e
    except aex.ChannelAccessRefused as e:
        raise BrokerError(f"{what}: {e}; give the user configure/write/read permissions on "
                          "the namespace's queues and exchanges in this vhost") from e
    except TimeoutError as e:
        if publish:
            raise PublishError(f"{what}: no confirm from RabbitMQ in time (connection down, "
                               "or publishers blocked by a memory/disk alarm); the message may "
                               "or may not be stored, retrying may duplicate it") from e
        raise ConnectionLost(f"{what}: RabbitMQ did not answer in time") from e
    except Exception as e:
        if is_connection_failure(e, CONNECTION_ERRORS):
            raise ConnectionLost(f"{what}: the connection to RabbitMQ was lost ({e!r}); it "
                                 "reconnects by itself, the operation may be retried") from e
        if isinstance(e, aex.AMQPError):
            raise BrokerError(f"{what}: {type(e).__name__}: {e}") from e
        raise
