"""Pieces of the Redis consumer's fetch (:mod:`.consumer`): the wait command,
the streams to wait on, and the log lines a fetch reply calls for."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from brokers.redis.keys import BANDS, Stream
from brokers.redis.options import RedisBrokerOptions
from brokers.redis.scripts import pack_command

__all__ = ["report", "streams_after", "wait_command"]

log = structlog.get_logger("brokers.redis")


def wait_command(streams: dict[Any, Any], block_s: float) -> bytes:
    """``XREAD COUNT 1 BLOCK ms STREAMS`` the priority streams after their last
    ids: it consumes nothing, it returns when one of them gets an entry."""
    return pack_command([b"XREAD", b"COUNT", b"1", b"BLOCK", b"%d" % int(block_s * 1000),
                         b"STREAMS", *streams.keys(), *streams.values()])


def streams_after(keys: Sequence[str], last: Sequence[Any], queues: int) -> dict[Any, Any]:
    """The priority streams of a fetch's ``keys`` with the last ids it found."""
    per = BANDS + 1
    return {keys[j * per + b]: last[j * BANDS + b] for j in range(queues) for b in range(BANDS)}


def report(lost: Sequence[int], dead: Sequence[Any], slots: Sequence[Stream | None],
           opts: RedisBrokerOptions) -> None:
    """Log what a fetch found wrong: groups recreated, entries dead-lettered."""
    for ki in lost:
        stream = slots[ki - 1]
        assert stream is not None
        log.error("DATA LOSS: the consumer group of a queue was missing (Redis restarted "
                  "without persistence, or its keys were deleted); recreated it at id 0. "
                  "Messages published before the loss are gone.",
                  queue=stream.queue.name, stream=stream.key, group=opts.group)
    if dead:
        log.warning("dead-lettered messages past max_deliveries, too large or malformed",
                    count=len(dead), max_deliveries=opts.max_deliveries,
                    max_message_bytes=opts.max_message_bytes)
