"""The event stream: what happened, in order, resumable after a disconnect.

Every task transition, progress update, worker online/heartbeat/offline and
scheduler tick is a typed, versioned event (a msgspec Struct tagged by
``kind``; each carries ``v``, the version of its fields; readers ignore fields
they do not know and refuse nothing; see :mod:`runtime.ops.event_types`).
Events go to a bounded stream:

- on Redis (when the result store or broker is Redis), the stream
  ``{ns}:ops:{<ns>}:events``, written by :class:`runtime.ops.writer.RedisWriter`:
  wire 2 (``STREAM_WIRE``) keeps each batch the writer sends as ONE entry, fields
  ``v`` (``"2"``), ``n`` (events) and ``b`` (the events' JSON joined by newlines), and
  trims the oldest entries after each batch while the newer ones hold ``max_len``
  events; event ``k`` (from 0) of entry ``<ms>-<seq>`` has the id ``<ms>-<seq>:<k>``.
  Entries of wire 1 (one event each, field ``e``, id the entry's) are read as
  before; an entry of a later wire is skipped with a warning naming it (and a
  reader of wire 1 skips each wire-2 entry with its "cannot read" warning);
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

__all__ = ["EVENTS_VERSION", "STREAM_WIRE", "Event", "EventRecord", "Gap", "MemoryEventStream",
           "ProgressEvent", "RedisEventStream", "TaskEvent", "TickEvent", "WorkerEvent",
           "task_event"]

log = structlog.get_logger("taskloom.ops.events")

DEFAULT_MAX_LEN = 100_000
#: The version of the stream's entries this reader and ``lua/transitions.lua`` write.
STREAM_WIRE = 2
_BLOCK_MS = 5_000
_READ_COUNT = 500
_DEC: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def _seq(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition(":")[0].partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        from runtime.errors import ConfigError

        raise ConfigError(f"bad event id {stream_id!r}: pass the id of an event you read, "
                          "'0' for the oldest kept, or None for new events only") from None


def _place(stream_id: str) -> tuple[str, int]:
    """An event id as (its stream entry, the index of the event in it; -1 for an
    entry's id alone: all of it was seen)."""
    entry, sep, k = stream_id.partition(":")
    _seq(entry)
    if not sep:
        return entry, -1
    try:
        return entry, int(k)
    except ValueError:
        from runtime.errors import ConfigError

        raise ConfigError(f"bad event id {stream_id!r}: pass the id of an event you read, "
                          "'0' for the oldest kept, or None for new events only") from None


def _records(entry_id: str, fields: dict[bytes, bytes], after: int = -1
             ) -> list[EventRecord]:
    """The events of one stream entry (of wire 1 or 2), those after index ``after``."""
    out: list[EventRecord] = []
    batch = fields.get(b"b")
    if batch is None:  # wire 1: one event, the entry's id
        lines, wire1 = [fields.get(b"e", b"")], True
    elif fields.get(b"v") != b"%d" % STREAM_WIRE:
        log.warning("skipping events of a stream wire this version cannot read; upgrade this "
                    "reader to the taskloom that wrote them", id=entry_id,
                    wire=fields.get(b"v", b"?").decode(errors="replace"), wire_read=STREAM_WIRE)
        return out
    else:
        lines, wire1 = batch.split(b"\n"), False
    for k, raw in enumerate(lines):
        if k <= after:
            continue
        rid = entry_id if wire1 else f"{entry_id}:{k}"
        try:
            out.append(EventRecord(rid, _DEC.decode(raw)))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("skipping an event this version cannot read", id=rid, error=str(e))
    return out


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
                    last, seen = _place(since)
                    first = await client.xrange(self.key, "-", "+", count=1)
                    if (last not in ("0", "0-0") and first
                            and _seq(first[0][0].decode()) > _seq(last)):
                        # what followed ``since`` may have been trimmed (conservative)
                        yield EventRecord(since, Gap(since=since,
                                                     resumed_at=first[0][0].decode()))
                    elif seen >= 0:  # the rest of the entry ``since`` is in
                        for entry_id, fields in await client.xrange(self.key, last, last):
                            for rec in _records(entry_id.decode(), fields, seen):
                                yield rec
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
                        for rec in _records(last, fields):
                            yield rec
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
