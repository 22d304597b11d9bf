"""One surface for operators: ``Operations(rt)``, and the listeners the runtime opens.

    async with rt:
        ops = Operations(rt)
        page = await ops.tasks(state="failed", queue="emails", limit=50)
        await ops.retry(page.items[0].id)
        print(await ops.replay("emails", reason="failed", dry_run=True))
        async for rec in ops.events(since="0"):
            ...

State lives beside the result store (Redis when it is Redis, else this
process): see :mod:`runtime.ops.index`, :mod:`runtime.ops.events`,
:mod:`runtime.ops.pauses`, :mod:`runtime.ops.workers`.

``listeners_for(rt)`` gives the task index and the event stream as
``runtime.lifecycle.Listener`` objects; the runtime calls it when it opens, and
``Operations(rt)`` then reads the same objects (in memory, the only copy).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

from runtime.errors import ConfigError, TaskloomError
from runtime.lifecycle import Listener, Phase
from runtime.ops.common import redis_url_of
from runtime.ops.events import DEFAULT_MAX_LEN, EventRecord, MemoryEventStream, RedisEventStream
from runtime.ops.index import (
    IndexSettings,
    Page,
    Query,
    RedisIndex,
    TaskIndex,
    TaskSummary,
    index_for,
)
from runtime.ops.pauses import MemoryPauses, Pauses, RedisPauses
from runtime.ops.verbs import (
    CancelReport,
    DeadFilter,
    DeadReport,
    RetryReport,
    cancel,
    purge_dead,
    replay,
    retry,
)
from runtime.ops.workers import HeartbeatSource, RedisHeartbeats, WorkerInfo, orphans, to_info
from runtime.ops.writer import RedisWriter

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Operations", "events_of", "listeners_for", "pauses_for", "use_heartbeats"]

EventStream = MemoryEventStream | RedisEventStream


class _Parts:
    def __init__(self) -> None:
        self.index: TaskIndex | None = None
        self.events: EventStream | None = None
        self.pauses: Pauses | None = None
        self.heartbeats: HeartbeatSource | None = None


_parts: weakref.WeakKeyDictionary[Runtime, _Parts] = weakref.WeakKeyDictionary()


def _parts_of(rt: Runtime) -> _Parts:
    parts = _parts.get(rt)
    if parts is None:
        parts = _parts[rt] = _Parts()
    return parts


def _new_events(rt: Runtime, max_len: int) -> EventStream:
    url = redis_url_of(rt)
    if url is None:
        return MemoryEventStream(max_len=max_len)
    return RedisEventStream(url, namespace=rt.namespace, max_len=max_len)


def listeners_for(rt: Runtime, *, index: bool | IndexSettings = True, events: bool = True,
                  events_max_len: int = DEFAULT_MAX_LEN) -> list[Listener]:
    """The listeners to open with ``rt``: the task index and the event stream
    (each can be switched off). Call once per open; ``Operations(rt)`` reads them.

    On Redis, both are written by one ``RedisWriter`` (the one listener): a
    transition is one append, and one script call per batch writes the index
    entries and the events together."""
    parts = _parts_of(rt)
    settings = index if isinstance(index, IndexSettings) else None
    url = redis_url_of(rt)
    if url is not None and index is not False and events:
        writer = RedisWriter(url, namespace=rt.namespace, index=settings or IndexSettings(),
                             events_max_len=events_max_len)
        parts.index = RedisIndex(url, namespace=rt.namespace, settings=writer.index,
                                 writer=writer)
        parts.events = RedisEventStream(url, namespace=rt.namespace, max_len=events_max_len,
                                        writer=writer)
        writer.also_close.append(parts.index)
        return [writer]
    out: list[Listener] = []
    if index is not False:
        parts.index = index_for(rt, settings)
        out.append(parts.index)
    if events:
        parts.events = _new_events(rt, events_max_len)
        out.append(parts.events)
    return out


def events_of(rt: Runtime) -> EventStream | None:
    """The event stream ``listeners_for(rt)`` opened, if any (workers publish
    their online/heartbeat/offline events to it)."""
    return _parts_of(rt).events


def use_heartbeats(rt: Runtime, source: HeartbeatSource) -> None:
    """Where ``Operations(rt).workers()`` reads heartbeats when ``rt`` keeps them
    in this process (``runtime.process.liveness`` registers its memory store)."""
    _parts_of(rt).heartbeats = source


def pauses_for(rt: Runtime) -> Pauses:
    """The paused-queue view of ``rt`` (one per runtime): a worker runs its
    ``watch`` and consults ``is_paused(queue)``; see :mod:`runtime.ops.pauses`."""
    parts = _parts_of(rt)
    if parts.pauses is None:
        url = redis_url_of(rt)
        parts.pauses = (MemoryPauses() if url is None
                        else RedisPauses(url, namespace=rt.namespace))
    return parts.pauses


def _phases(state: str | Phase | Iterable[str | Phase] | None) -> tuple[Phase, ...]:
    if state is None:
        return ()
    items = [state] if isinstance(state, str | Phase) else list(state)
    try:
        return tuple(Phase(s) for s in items)
    except ValueError:
        raise ConfigError(f"unknown state in {items!r}; use one of "
                          f"{', '.join(p.value for p in Phase)}") from None


class Operations:
    """What an operator sees and does on a running deployment of ``rt``."""

    def __init__(self, rt: Runtime, *, heartbeats: HeartbeatSource | None = None) -> None:
        self.rt = rt
        parts = _parts_of(rt)
        url = redis_url_of(rt)
        self._owned: list[TaskIndex | EventStream] = []
        self._index = parts.index
        self._events = parts.events
        if url is not None:  # a reader of its own: the listeners may be off or elsewhere
            if self._index is None:
                self._index = index_for(rt)
                self._owned.append(self._index)
            if self._events is None:
                self._events = _new_events(rt, DEFAULT_MAX_LEN)
                self._owned.append(self._events)
        self._pauses = pauses_for(rt)
        self._redis_beats = RedisHeartbeats(url, namespace=rt.namespace) if url else None
        self._heartbeats = heartbeats
        self._parts = parts

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for part in self._owned:
            await part.aclose()
        if self._redis_beats is not None:
            await self._redis_beats.aclose()

    def _need_index(self) -> TaskIndex:
        if self._index is None:
            raise TaskloomError("the task index is off for this runtime: open it with the "
                                "index listener on (listeners_for(rt)) to list tasks")
        return self._index

    # -- seeing --------------------------------------------------------------------

    async def tasks(self, *, state: str | Phase | Iterable[str | Phase] | None = None,
                    queue: str | None = None, name: str | None = None,
                    since_ms: int | None = None, until_ms: int | None = None,
                    limit: int = 50, cursor: str | None = None,
                    since: int | None = None, until: int | None = None) -> Page:
        """Tasks newest first, filtered; pass ``page.next_cursor`` for the next page.
        Times are ms since the epoch (``since``/``until`` are aliases)."""
        since_ms = since_ms if since_ms is not None else since
        until_ms = until_ms if until_ms is not None else until
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        return await self._need_index().query(Query(
            states=_phases(state), queue=queue, name=name, since_ms=since_ms,
            until_ms=until_ms, limit=limit, cursor=cursor))

    async def task(self, task_id: str) -> TaskSummary | None:
        return await self._need_index().get(task_id)

    async def count(self, state: str | Phase, *, queue: str | None = None,
                    name: str | None = None) -> int:
        return await self._need_index().count(_phases(state)[0], queue=queue, name=name)

    async def workers(self) -> list[WorkerInfo]:
        """The live workers (their heartbeats not yet expired), by id."""
        if self._redis_beats is not None:
            return await self._redis_beats.list()
        source = self._heartbeats or self._parts.heartbeats
        if source is not None:
            return [to_info(b) for b in await source.list()]
        return []

    async def orphans(self, *, limit: int = 1000) -> list[TaskSummary]:
        """Started tasks whose worker is gone (until the broker redelivers them)."""
        return await orphans(self._need_index(), await self.workers(), limit=limit)

    def events(self, since: str | None = None) -> AsyncIterator[EventRecord]:
        """Events after ``since`` (None: from now; "0": the oldest kept)."""
        if self._events is None:
            raise TaskloomError("events are off for this runtime: open it with the events "
                                "listener on (listeners_for(rt, events=True))")
        return self._events.events(since)

    # -- steering ------------------------------------------------------------------

    async def retry(self, task_id: str, *, queue: str | None = None) -> RetryReport:
        return await retry(self.rt, self._index, task_id, queue=queue)

    async def replay(self, queue: str, *, reason: str | None = None, name: str | None = None,
                     since_ms: int | None = None, until_ms: int | None = None,
                     ids: Sequence[str] | None = None, limit: int | None = None,
                     dry_run: bool = False) -> DeadReport:
        """Publish again (as new attempts) the dead letters of ``queue`` that match;
        ``dry_run`` only counts them."""
        f = DeadFilter(reason=reason, task=name, since_ms=since_ms, until_ms=until_ms,
                       ids=tuple(ids) if ids else None, limit=limit)
        return await replay(self.rt, queue, f, dry_run=dry_run)

    async def purge_dead(self, queue: str, *, reason: str | None = None,
                         name: str | None = None, since_ms: int | None = None,
                         until_ms: int | None = None, ids: Sequence[str] | None = None,
                         limit: int | None = None, dry_run: bool = False) -> DeadReport:
        """Remove the dead letters of ``queue`` that match; ``dry_run`` only counts."""
        f = DeadFilter(reason=reason, task=name, since_ms=since_ms, until_ms=until_ms,
                       ids=tuple(ids) if ids else None, limit=limit)
        return await purge_dead(self.rt, queue, f, dry_run=dry_run)

    async def cancel(self, ids: Sequence[str] | str = (), *, name: str | None = None,
                     queue: str | None = None) -> CancelReport:
        """Cancel the tasks ``ids`` (one id or many), or every pending task
        (enqueued, scheduled, retrying) of task ``name`` or ``queue``."""
        if isinstance(ids, str):
            ids = [ids]
        if not ids and name is None and queue is None:
            raise ConfigError("cancel needs ids, a task name or a queue: with none it would "
                              "cancel nothing (or everything)")
        return await cancel(self.rt, self._index, ids=ids, name=name, queue=queue)

    async def pause(self, queue: str) -> bool:
        """Workers stop taking from ``queue`` (enqueue still works); whether it changed."""
        return await self._pauses.set_paused(queue, True)

    async def resume(self, queue: str) -> bool:
        return await self._pauses.set_paused(queue, False)

    async def paused(self) -> set[str]:
        return await self._pauses.paused()
