"""The event stream: what happened, in order, resumable after a disconnect.

Every task transition, progress update, worker online/heartbeat/offline and
scheduler tick is a typed, versioned event (a msgspec Struct tagged by
``kind``; each carries ``v``, the version of its fields; readers ignore fields
they do not know and refuse nothing). Events go to a bounded stream:

- on Redis (when the result store or broker is Redis), the stream
  ``{ns}:ops:{<ns>}:events``, trimmed with ``XADD MAXLEN ~ max_len``; ids are
  Redis stream ids;
- else a ring buffer of this process (ids ``"<n>-0"``, counting up).

``async for rec in stream.events(since=id)`` yields every event after ``id``
(``None``: from now on; ``"0"``: from the oldest kept), blocking on the server
(``XREAD BLOCK``) or on a condition, never polling. A reader that reconnects
with the last id it saw misses nothing still kept; if the events after its id
were trimmed meanwhile, it first gets a ``Gap`` saying so.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
import msgspec
import redis.exceptions as rex
import structlog

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import BatchWriter, OpsUnavailable, ops_prefix, redis_client

__all__ = ["EVENTS_VERSION", "Event", "EventRecord", "Gap", "MemoryEventStream", "ProgressEvent",
           "RedisEventStream", "TaskEvent", "TickEvent", "WorkerEvent", "task_event"]

log = structlog.get_logger("taskloom.ops.events")

EVENTS_VERSION = 1
DEFAULT_MAX_LEN = 100_000
_MAX_PENDING = 200_000
#: Many entries in one call (one command to pack, not one per event).
_XADD = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
end
return #ARGV - 1
"""
_XADD_SHA = hashlib.sha1(_XADD.encode()).hexdigest()
_BLOCK_MS = 5_000
_READ_COUNT = 500


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag="task",
                tag_field="kind"):
    """A task moved to ``phase`` (the fields of ``runtime.lifecycle.Transition``)."""

    id: str
    task: str
    queue: str
    phase: Phase
    at_ms: int
    attempt: int = 1
    worker: str = ""
    eta_ms: int | None = None
    error_type: str = ""
    error: str = ""
    reason: str = ""
    parent_id: str = ""
    root_id: str = ""
    v: int = EVENTS_VERSION


class ProgressEvent(msgspec.Struct, frozen=True, kw_only=True,
                    tag="progress", tag_field="kind"):
    id: str
    task: str
    at_ms: int
    current: float = 0.0
    total: float | None = None
    message: str = ""
    v: int = EVENTS_VERSION


class WorkerEvent(msgspec.Struct, frozen=True, kw_only=True, tag="worker",
                  tag_field="kind"):
    worker: str
    what: Literal["online", "heartbeat", "offline"]
    at_ms: int
    state: str = ""
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    lag_ms: float = 0.0
    v: int = EVENTS_VERSION


class TickEvent(msgspec.Struct, frozen=True, kw_only=True, tag="tick",
                tag_field="kind"):
    """A scheduler published (or skipped) one tick of a schedule."""

    schedule: str
    task_id: str
    tick_ms: int
    at_ms: int
    skipped: bool = False
    v: int = EVENTS_VERSION


class Gap(msgspec.Struct, frozen=True, kw_only=True, tag="gap", tag_field="kind"):
    """Events after ``since`` were trimmed before this reader got them."""

    since: str
    resumed_at: str
    v: int = EVENTS_VERSION


Event = TaskEvent | ProgressEvent | WorkerEvent | TickEvent | Gap


class EventRecord(msgspec.Struct, frozen=True):
    """One event and its stream id (pass the id as ``since`` to resume after it)."""

    id: str
    event: Event


_ENC = msgspec.json.Encoder()
_TASK_HEAD = b'{"kind":"task","v":%d,' % EVENTS_VERSION
_DEC: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def task_event(t: Transition) -> TaskEvent:
    return TaskEvent(id=t.id, task=t.task, queue=t.queue, phase=t.phase, at_ms=t.at_ms,
                     attempt=t.attempt, worker=t.worker, eta_ms=t.eta_ms,
                     error_type=t.error_type, error=t.error[:500], reason=t.reason,
                     parent_id=t.parent_id, root_id=t.root_id)


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


class RedisEventStream(BatchWriter[bytes]):
    """The stream ``{ns}:ops:{<ns>}:events``, written in batches from ``serve``."""

    def __init__(self, url: str, *, namespace: str = "", max_len: int = DEFAULT_MAX_LEN) -> None:
        super().__init__(log=log, retry_message="could not publish events; retrying")
        self.url = url
        self.key = ops_prefix(namespace) + "events"
        self.max_len = max_len
        self._redis: Any = redis_client(url)

    def publish(self, event: Event) -> None:
        pending = self._pending
        pending.append(_ENC.encode(event))
        if len(pending) > _MAX_PENDING:
            del pending[0]
        if len(pending) == 1:
            self._wake.set()

    def transition(self, t: Transition, /) -> None:
        # the TaskEvent's JSON without building one: Transition has its fields
        pending = self._pending
        pending.append(_TASK_HEAD + _ENC.encode(t)[1:] if len(t.error) <= 500
                       else _ENC.encode(task_event(t)))
        if len(pending) > _MAX_PENDING:
            del pending[0]
        if len(pending) == 1:
            self._wake.set()

    async def flush(self) -> None:
        while self._pending:
            batch = self._pending[:1000]
            try:
                try:
                    await self._redis.evalsha(_XADD_SHA, 1, self.key, self.max_len, *batch)
                except rex.NoScriptError:
                    await self._redis.eval(_XADD, 1, self.key, self.max_len, *batch)
            except Exception as e:
                raise OpsUnavailable(f"the event stream on {self.url} cannot be written "
                                     f"({type(e).__name__}: {e}); check that Redis is up") from e
            del self._pending[: len(batch)]

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(5.0, shield=True):
                await self.flush()
        except OpsUnavailable as e:
            log.warning("events lost on close", error=str(e), lost=len(self._pending))
        finally:
            with anyio.CancelScope(shield=True):
                await self._redis.aclose()

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

