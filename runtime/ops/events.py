"""The event stream: what happened, in order, resumable after a disconnect.

Every task transition, progress update, worker online/heartbeat/offline and
scheduler tick is a typed, versioned event (a msgspec Struct tagged by
``kind``; each carries ``v``, the version of its fields; readers ignore fields
they do not know and refuse nothing; see :mod:`runtime.ops.event_types`).
Events go to a bounded stream:

- on Redis (when the result store or broker is Redis), the stream
  ``{ns}:ops:{<ns>}:events``, trimmed to about ``max_len`` (``XTRIM MAXLEN ~``) after each batch;
  ids are Redis stream ids; written by :class:`runtime.ops.writer.RedisWriter`;
- else a ring buffer of this process (ids ``"<n>-0"``, counting up).

``async for rec in stream.events(since=id)`` yields every event after ``id``
(``None``: from now on; ``"0"``: from the oldest kept), blocking on the server
(``XREAD BLOCK``) or on a condition, never polling. A reader that reconnects
with the last id it saw misses nothing still kept; if the events after its id
were trimmed meanwhile, it first gets a ``Gap`` saying so.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import structlog

from runtime.lifecycle import Transition
from runtime.ops.common import OpsUnavailable, ops_prefix, redis_client
from runtime.ops.event_types import (
    EVENTS_VERSION,
    Event,
    EventRecord,
    Gap,
    ProgressEvent,
    TaskEvent,
    TickEvent,
    WorkerEvent,
    task_event,
)
from runtime.ops.writer import RedisWriter

__all__ = ["EVENTS_VERSION", "Event", "EventRecord", "Gap", "MemoryEventStream", "ProgressEvent",
           "RedisEventStream", "TaskEvent", "TickEvent", "WorkerEvent", "task_event"]

log = structlog.get_logger("taskloom.ops.events")

DEFAULT_MAX_LEN = 100_000
_BLOCK_MS = 5_000
_READ_COUNT = 500
_DEC: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def _seq(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        from runtime.errors import ConfigError

        raise ConfigError(f"bad event id {stream_id!r}: pass the id of an event you read, "
                          "'0' for the oldest kept, or None for new events only") from None


class MemoryEventStream:
    """A ring buffer of this process's events (the embedded default)."""

    def __init__(self, *, max_len: int = DEFAULT_MAX_LEN) -> None:
        self.max_len = max_len
        self._ring: collections.deque[tuple[int, Event]] = collections.deque(maxlen=max_len)
        self._next = 1
        self._changed = anyio.Event()

    def publish(self, event: Event) -> None:
        """Append ``event`` (cheap; never raises)."""
        self._ring.append((self._next, event))
        self._next += 1
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def transition(self, t: Transition, /) -> None:
        self.publish(task_event(t))

    async def serve(self) -> None:
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        return None

    async def events(self, since: str | None = None) -> AsyncIterator[EventRecord]:
        last = self._next - 1 if since is None else _seq(since)[0]
        ring = self._ring
        if ring and since is not None and last + 1 < ring[0][0] and last != 0:
            yield EventRecord(f"{ring[0][0] - 1}-0",
                              Gap(since=since, resumed_at=f"{ring[0][0]}-0"))
        while True:
            changed = self._changed
            if ring and ring[-1][0] > last:
                start = max(0, len(ring) - (ring[-1][0] - last))
                for n, event in list(ring)[start:]:
                    if n > last:
                        last = n
                        yield EventRecord(f"{n}-0", event)
                continue
            await changed.wait()


class RedisEventStream:
    """The stream ``{ns}:ops:{<ns>}:events``: read here, written by a ``RedisWriter``
    (its own, or one shared with the task index so that a transition costs one
    append and one script call writes both)."""

    def __init__(self, url: str, *, namespace: str = "", max_len: int = DEFAULT_MAX_LEN,
                 writer: RedisWriter | None = None) -> None:
        self.url = url
        self.key = ops_prefix(namespace) + "events"
        self.max_len = max_len
        self._owns = writer is None
        self.writer = writer or RedisWriter(url, namespace=namespace, events_max_len=max_len)

    def publish(self, event: Event) -> None:
        """Append ``event`` (cheap; never raises); written in batches by ``serve``."""
        self.writer.publish(event)

    def transition(self, t: Transition, /) -> None:
        self.writer.transition(t)

    async def serve(self) -> None:
        await self.writer.serve()

    async def flush(self) -> None:
        await self.writer.flush()

    async def aclose(self) -> None:
        if self._owns:
            await self.writer.aclose()

    async def events(self, since: str | None = None) -> AsyncIterator[EventRecord]:
        client: Any = redis_client(self.url, blocking=True)
        delay = 0.05
        try:
            try:
                if since is None:  # "$" resolved now, so a reconnect before any event loses none
                    newest = await client.xrevrange(self.key, "+", "-", count=1)
                    last = newest[0][0].decode() if newest else "0-0"
                else:
                    last = since
                    first = await client.xrange(self.key, "-", "+", count=1)
                    if (since not in ("0", "0-0") and first
                            and _seq(first[0][0].decode()) > _seq(since)):
                        # what followed ``since`` may have been trimmed (conservative)
                        yield EventRecord(since, Gap(since=since,
                                                     resumed_at=first[0][0].decode()))
            except OpsUnavailable:
                raise
            except Exception as e:
                raise OpsUnavailable(f"the event stream on {self.url} cannot be read "
                                     f"({type(e).__name__}: {e}); check that Redis is up") from e
            while True:
                try:
                    reply = await client.xread({self.key: last}, count=_READ_COUNT,
                                               block=_BLOCK_MS)
                    delay = 0.05
                except Exception as e:  # connection lost: resume from ``last``
                    log.warning("event stream read failed; reconnecting", error=str(e))
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                for _key, entries in reply or ():
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        try:
                            event = _DEC.decode(fields[b"e"])
                        except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as e:
                            log.warning("skipping an event this version cannot read",
                                        id=last, error=str(e))
                            continue
                        yield EventRecord(last, event)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

