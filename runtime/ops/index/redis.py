"""The task index on Redis, beside the result store.

Keys, layout 2 (``P`` is ``{ns}:ops:{<ns>}:``, one hash tag per namespace)::

    P ix2:<state>     zset    task id -> time it entered the state (ms)
    P ix2:<state>:c   hash    'q:<queue>' / 'n:<task name>' -> how many tasks of the
                              state are in that queue / of that name
    P t2:<id>         string  the task's summary, PX max age + 1 day:
                              'v2 <order> <enqueued_ms|-> <started_ms|-> <state> <worker>'
                              then a newline and the JSON of its latest ``TaskEvent``

Writes go through a :class:`runtime.ops.writer.RedisWriter` (its own, or one
shared with the event stream): a batch is one EVALSHA of ``lua/transitions.lua``
per chunk, which per task reads its previous summary (one GET), moves the id
between its states' sets (O(log n)), writes the summary (one SET) and adjusts the
counts; once per chunk it trims each state's set it touched to its count and age
(dropping the trimmed tasks' summaries), so the index never grows past
``max_per_state`` per state. A listing by queue or task name walks the state's
set newest first and keeps the summaries that match; a count by queue or task
name is one HGET.

Layout 1 (``ix:`` sets per state, queue and name; ``t:`` hashes) is neither read
nor written: readers of layout 1 (taskloom before this layout) find no ``ix:``
keys and list nothing; this reader skips, with a warning naming the layout, a
summary whose first word is not ``v2``, and when a first page comes back empty
while a state's layout-1 set exists (workers not upgraded) it warns once, naming
the key and what to do.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import OpsUnavailable, ops_prefix, redis_client
from runtime.ops.event_types import TaskEvent
from runtime.ops.index.model import (
    IndexSettings,
    Page,
    Query,
    TaskSummary,
    after,
    decode_cursor,
    encode_cursor,
    states_of,
)
from runtime.ops.writer import RedisWriter

__all__ = ["LAYOUT", "RedisIndex", "summary_key"]

log = structlog.get_logger("taskloom.ops.index")

#: The version of the key layout above (the first word of each summary is ``v<LAYOUT>``).
LAYOUT = 2
_MARK = b"v%d" % LAYOUT
#: Entries read per round trip when a listing filters by queue or task name (it grows
#: from the page size up to this while few entries match).
_SCAN_MAX = 5_000
_EVENT: msgspec.json.Decoder[TaskEvent] = msgspec.json.Decoder(TaskEvent)


def summary_key(prefix: str, task_id: str) -> str:
    return f"{prefix}t{LAYOUT}:{task_id}"


class RedisIndex:
    """The task index on Redis: read here, written by a ``RedisWriter`` (its own,
    or one shared with the event stream); a ``Listener`` through it."""

    def __init__(self, url: str, *, namespace: str = "",
                 settings: IndexSettings | None = None, writer: RedisWriter | None = None
                 ) -> None:
        self.url = url
        self.settings = settings or IndexSettings()
        self.prefix = ops_prefix(namespace)
        self._redis: Any = redis_client(url)
        self._owns = writer is None
        self.writer = writer or RedisWriter(url, namespace=namespace, index=self.settings)
        self._older_layout_checked = False

    @property
    def dropped(self) -> int:
        """Transitions dropped while Redis was away (past the writer's buffer)."""
        return self.writer.dropped

    # -- Listener ------------------------------------------------------------------

    def transition(self, t: Transition, /) -> None:
        self.writer.transition(t)

    async def serve(self) -> None:
        await self.writer.serve()

    async def flush(self) -> None:
        """Write every pending transition."""
        await self.writer.flush()

    async def aclose(self) -> None:
        try:
            if self._owns:
                await self.writer.aclose()
        finally:
            await self._redis.aclose()

    # -- reading -------------------------------------------------------------------

    def _key(self, state: Phase) -> str:
        return f"{self.prefix}ix{LAYOUT}:{state.value}"

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await fn(*args)
        except Exception as e:
            raise OpsUnavailable(f"could not {what} on {self.url} ({type(e).__name__}: {e}); "
                                 "check that Redis is up") from e

    async def get(self, task_id: str) -> TaskSummary | None:
        raw = await self._call("read a task summary", self._redis.get,
                               summary_key(self.prefix, task_id))
        return _summary(raw)

    async def count(self, state: Phase, *, queue: str | None = None,
                    name: str | None = None) -> int:
        """Tasks in ``state`` (of ``queue``, else of task ``name``, when given)."""
        key = self._key(state)
        if queue is None and name is None:
            return int(await self._call("count the task index", self._redis.zcard, key))
        if queue is not None and name is not None:  # no count kept: the listing's walk
            total, cursor = 0, None
            while True:
                page = await self.query(Query(states=(state,), queue=queue, name=name,
                                              limit=_SCAN_MAX, cursor=cursor))
                total += len(page.items)
                if (cursor := page.next_cursor) is None:
                    return total
        field = f"q:{queue}" if queue is not None else f"n:{name}"
        found = await self._call("count the task index", self._redis.hget, key + ":c", field)
        return max(0, int(found or 0))

    async def query(self, q: Query) -> Page:
        cursor = decode_cursor(q.cursor)
        top = cursor[0] if cursor is not None else "+inf"
        if q.until_ms is not None and (top == "+inf" or q.until_ms < int(top)):
            top = q.until_ms
        low = q.since_ms if q.since_ms is not None else "-inf"
        filtered = q.queue is not None or q.name is not None
        found: list[tuple[int, str, TaskSummary]] = []
        for state in states_of(q.states):
            key = self._key(state)
            offset, taken, chunk = 0, 0, max(q.limit, 100)
            while taken < q.limit:
                entries = await self._call("list the task index", self._redis.zrevrangebyscore,
                                           key, top, low, offset, chunk, True)
                offset += len(entries)
                fresh = [(int(sc), m.decode()) for m, sc in entries]
                fresh = [(sc, i) for sc, i in fresh if after(sc, i, cursor)]
                summaries = await self._hydrate([i for _, i in fresh])
                for (sc, i), s in zip(fresh, summaries, strict=True):
                    if (s is None or s.state is not state
                            or (q.queue is not None and s.queue != q.queue)
                            or (q.name is not None and s.name != q.name)):
                        continue
                    found.append((sc, i, s))
                    taken += 1
                    if taken >= q.limit:
                        break
                if len(entries) < chunk:
                    break
                if filtered:  # few may match: read more per round trip
                    chunk = min(chunk * 2, _SCAN_MAX)
        found.sort(key=lambda x: (x[0], x[1]), reverse=True)
        if not found and cursor is None:
            await self._warn_of_an_older_layout(states_of(q.states))
        page = found[: q.limit]
        nxt = encode_cursor(page[-1][0], page[-1][1]) if len(page) == q.limit else None
        return Page(items=[s for _, _, s in page], next_cursor=nxt)

    async def _warn_of_an_older_layout(self, states: tuple[Phase, ...]) -> None:
        """Once per reader, on an empty first page: are layout-1 sets there? Then
        workers older than this reader are writing where it never looks."""
        if self._older_layout_checked:
            return
        self._older_layout_checked = True
        old = [f"{self.prefix}ix:{state.value}" for state in states]
        if old and await self._call("check the task index layout", self._redis.exists, *old):
            log.warning("the task index holds keys of an older layout (1) that this "
                        f"reader (layout {LAYOUT}) does not read: workers of an older taskloom "
                        "are writing it; upgrade every worker and reader together",
                        keys=old[:3])

    async def _hydrate(self, ids: list[str]) -> list[TaskSummary | None]:
        if not ids:
            return []
        raws = await self._call("read task summaries", self._redis.mget,
                                [summary_key(self.prefix, i) for i in ids])
        return [_summary(raw) for raw in raws]


def _summary(raw: bytes | None) -> TaskSummary | None:
    """A stored summary (see the layout above), or None if there is none or it
    cannot be read (logged)."""
    if raw is None:
        return None
    head, _, body = raw.partition(b"\n")
    words = head.split(b" ", 5)
    if words[0] != _MARK or len(words) != 6:
        log.warning("skipping a task summary this version cannot read: it is not of index "
                    f"layout {LAYOUT}; upgrade the taskloom that reads it to the one that "
                    "wrote it", first_word=words[0][:20].decode(errors="replace"))
        return None
    _, _, enq, started, _, worker = words
    try:
        e = _EVENT.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        log.warning("skipping a malformed task summary", error=str(err))
        return None
    return TaskSummary(
        id=e.id, name=e.task, state=e.phase, queue=e.queue, attempt=e.attempt, at_ms=e.at_ms,
        enqueued_ms=None if enq == b"-" else int(enq),
        started_ms=None if started == b"-" else int(started),
        finished_ms=e.at_ms if e.phase.final else None, eta_ms=e.eta_ms,
        worker=worker.decode(), error_type=e.error_type, error=e.error, reason=e.reason,
        parent_id=e.parent_id, root_id=e.root_id)
