"""The Redis key layout of the broker and the format of its entries.

Every key lives under the namespace prefix, hash-tagged per queue so that one
queue lives in one Redis Cluster slot::

    <ns>:{<queue>}:p0 … :p9    one stream per priority level, group "taskloom"
    <ns>:{<queue>}:delayed     sorted set of delayed messages, score = due (ms, Redis clock)
    <ns>:{<queue>}:dead        dead-letter stream (fields e, r = reason, c = deliveries)

A stream entry is ``e`` (the msgpack-encoded :class:`~brokers.base.Envelope`)
plus ``n`` (deliveries before this entry, when it was requeued). The delivery
count is ``n`` + the entry's delivery counter in the group's pending list.

A delayed-set member is ``<nonce>|<band><count>:<envelope>`` (the band one digit,
the deliveries before it, the encoded envelope).

Changing any of this is a change of the on-Redis format: workers of the old
layout would not find (or would misread) the new keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import msgspec

from brokers.base import ConfigError, Envelope

__all__ = ["BANDS", "Queue", "Stream", "band_of", "decode", "encode"]

#: Priority levels 0..BANDS-1, one stream each.
BANDS: Final = 10

#: The ``e`` field of a stream entry (and the tail of a delayed-set member).
encode: Final[Callable[[Envelope], bytes]] = msgspec.msgpack.Encoder().encode
#: The envelope of an ``e`` field; raises ``msgspec.DecodeError`` or
#: ``msgspec.ValidationError`` when it is not one.
_decode: Final[Callable[[bytes], Envelope]] = msgspec.msgpack.Decoder(Envelope).decode


def decode(data: bytes) -> Envelope:
    """An entry's envelope; ``msgspec.DecodeError`` for anything else, including
    string fields that are not UTF-8 (msgspec raises UnicodeDecodeError for those)."""
    try:
        return _decode(data)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"a string field is not UTF-8 ({e.reason})") from None


class Stream:
    """One priority stream of a queue."""

    __slots__ = ("band", "digit", "key", "queue")

    def __init__(self, queue: Queue, band: int) -> None:
        self.queue = queue
        self.band = band
        self.digit = str(band).encode()
        self.key = queue.streams[band]


class Queue:
    """The keys of one queue; they share the hash tag ``{queue}``."""

    __slots__ = ("bands", "dead", "delayed", "name", "streams")

    def __init__(self, prefix: str, name: str) -> None:
        if not name:
            raise ConfigError("a queue name must not be empty")
        tag = f"{prefix}{{{name}}}"
        self.name = name
        self.streams = [f"{tag}:p{band}" for band in range(BANDS)]
        self.delayed = f"{tag}:delayed"
        self.dead = f"{tag}:dead"
        self.bands = [Stream(self, band) for band in range(BANDS)]


def band_of(priority: int) -> int:
    """The priority stream of a message of ``priority`` (clamped to 0..BANDS-1)."""
    return 0 if priority <= 0 else min(priority, BANDS - 1)

