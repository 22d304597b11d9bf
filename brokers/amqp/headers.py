"""Message headers: taskloom's own, RabbitMQ's, and the user's.

**Headers are not trusted**: the delivery count headers (``x-taskloom-delivered``,
``x-delivery-count``) count only as an ``int`` in ``0..2**31-1``; anything else
(a string, float, bool, negative or enormous number, table) is treated as
absent, with an ``amqp.bad_header`` warning naming its type. User headers are
handed over as ``str`` (UTF-8 bytes decoded, integers and booleans as text);
tables, arrays, floats, decimals, timestamps and other bytes are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import structlog

__all__ = ["H_DEAD_AT", "H_DELIVERED", "H_REASON", "bounded", "count_header", "user_headers"]

log = structlog.get_logger("brokers.amqp")

#: Deliveries of this message before it was (re)published by the broker.
H_DELIVERED: Final = "x-taskloom-delivered"
#: Why a message was dead-lettered.
H_REASON: Final = "x-taskloom-reason"
#: When a message was dead-lettered by taskloom (epoch ms). Additive: a dead letter
#: written by an older taskloom has none, and then only RabbitMQ's ``x-death`` time
#: (if any) says when.
H_DEAD_AT: Final = "x-taskloom-dead-at"
_INTERNAL_PREFIX: Final = "x-taskloom-"
#: Headers RabbitMQ adds; never shown to users as envelope headers.
_SERVER_HEADERS: Final = frozenset({
    "x-death", "x-delivery-count", "x-first-death-queue", "x-first-death-reason",
    "x-first-death-exchange", "x-last-death-queue", "x-last-death-reason",
    "x-last-death-exchange",
})
#: Largest delivery count a header may carry; larger (or not an int) is ignored.
_MAX_COUNT: Final = 2**31 - 1


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def count_header(table: Mapping[str, Any], name: str, message_id: object) -> int | None:
    """The delivery count header ``name`` of ``table``: an ``int`` in
    ``0.._MAX_COUNT``, or None when it is absent or cannot be trusted (a string, a
    float, a bool, a negative or enormous number, a table...). A header that is
    present but unusable is treated as absent, with one warning that names its
    type, never its value: a count only guides retries, and what a publisher could
    say with a hostile count it can say by publishing the message again."""
    value = table.get(name)
    if value is None:
        return None
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return value
    log.warning("amqp.bad_header", header=name, type=type(value).__name__,
                message_id=bounded(message_id),
                note=f"not an integer in 0..{_MAX_COUNT}: treated as absent (a message "
                     "published outside taskloom, or tampered with)")
    return None


def bounded(value: object, limit: int = 200) -> str:
    text = _str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _header_value(value: Any) -> str | None:
    """A user header as the runtime sees it (``dict[str, str]``): strings as they
    are, UTF-8 bytes decoded, numbers as text; anything else (tables, arrays,
    timestamps, bytes that are not UTF-8, empty values) is dropped."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -_MAX_COUNT <= value <= _MAX_COUNT else None
    return None


def user_headers(table: Mapping[str, Any] | None) -> dict[str, str]:
    if not table:
        return {}
    headers: dict[str, str] = {}
    for k, v in table.items():
        if k.startswith(_INTERNAL_PREFIX) or k in _SERVER_HEADERS:
            continue
        text = _header_value(v)
        if text is not None:
            headers[k] = text
    return headers
