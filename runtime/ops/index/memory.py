"""The task index in this process (the embedded default)."""

from __future__ import annotations

import bisect

import anyio

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import now_ms
from runtime.ops.index.model import (
    IndexSettings,
    Page,
    Query,
    TaskSummary,
    after,
    decode_cursor,
    encode_cursor,
    order_of,
    states_of,
    summarize,
)

__all__ = ["MemoryIndex"]

_Key = tuple[Phase, str, str]  # (state, "" | "q" | "n", queue or name)


class MemoryIndex:
    """Sorted (time, id) lists per state, per state and queue, per state and
    task name; a summary per task. ``transition`` only appends to a buffer:
    ``serve`` (or any read) applies it."""

    def __init__(self, settings: IndexSettings | None = None) -> None:
        self.settings = settings or IndexSettings()
        self._pending: list[Transition] = []
        self._wake = anyio.Event()
        self._sets: dict[_Key, list[tuple[int, str]]] = {}
        self._tasks: dict[str, tuple[int, TaskSummary]] = {}

    # -- Listener ------------------------------------------------------------------

    def transition(self, t: Transition, /) -> None:
        self._pending.append(t)
        if len(self._pending) == 1:
            self._wake.set()

    async def serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._drain()

    async def aclose(self) -> None:
        self._drain()

    # -- writing -------------------------------------------------------------------

    async def flush(self) -> None:
        """Apply every pending transition."""
        self._drain()

    def _drain(self) -> None:
        pending, self._pending = self._pending, []
        for t in pending:
            self._apply(t)
        if pending:
            self._trim_age()

    def _keys(self, s: TaskSummary) -> tuple[_Key, _Key, _Key]:
        return (s.state, "", ""), (s.state, "q", s.queue), (s.state, "n", s.name)

    def _apply(self, t: Transition) -> None:
        order = order_of(t)
        found = self._tasks.get(t.id)
        old = None
        if found is not None:
            old_order, old = found
            if order < old_order:
                return
            self._unlink(old)
        s = summarize(t, old)
        self._tasks[t.id] = (order, s)
        for key in self._keys(s):
            bisect.insort(self._sets.setdefault(key, []), (s.at_ms, s.id))
        main = self._sets[(s.state, "", "")]
        while len(main) > self.settings.max_per_state:
            self._drop(main[0][1])

    def _unlink(self, s: TaskSummary) -> None:
        for key in self._keys(s):
            entries = self._sets.get(key)
            if entries is None:
                continue
            i = bisect.bisect_left(entries, (s.at_ms, s.id))
            if i < len(entries) and entries[i] == (s.at_ms, s.id):
                del entries[i]
            if not entries:
                del self._sets[key]

    def _drop(self, task_id: str) -> None:
        found = self._tasks.pop(task_id, None)
        if found is not None:
            self._unlink(found[1])

    def _trim_age(self) -> None:
        cutoff = now_ms() - int(self.settings.max_age_s * 1000)
        for state in Phase:
            entries = self._sets.get((state, "", ""))
            while entries and entries[0][0] < cutoff:
                self._drop(entries[0][1])
                entries = self._sets.get((state, "", ""))

    # -- reading -------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskSummary | None:
        self._drain()
        found = self._tasks.get(task_id)
        return found[1] if found is not None else None

    async def count(self, state: Phase, *, queue: str | None = None,
                    name: str | None = None) -> int:
        self._drain()
        key = ((state, "q", queue) if queue is not None else
               (state, "n", name) if name is not None else (state, "", ""))
        if queue is not None and name is not None:
            return sum(1 for _, i in self._sets.get(key, []) if self._tasks[i][1].name == name)
        return len(self._sets.get(key, []))

    async def query(self, q: Query) -> Page:
        self._drain()
        cursor = decode_cursor(q.cursor)
        hi = (cursor[0], cursor[1]) if cursor is not None else (1 << 62, "")
        if q.until_ms is not None and (q.until_ms, "\U0010ffff") < hi:
            hi = (q.until_ms, "\U0010ffff")
        lo = q.since_ms if q.since_ms is not None else -(1 << 62)
        found: list[tuple[int, str]] = []
        for state in states_of(q.states):
            key = ((state, "q", q.queue) if q.queue is not None else
                   (state, "n", q.name) if q.name is not None else (state, "", ""))
            entries = self._sets.get(key, [])
            i = bisect.bisect_left(entries, hi)
            taken = 0
            while i > 0 and taken < q.limit:
                i -= 1
                score, task_id = entries[i]
                if score < lo:
                    break
                if not after(score, task_id, cursor):
                    continue
                if q.name is not None and self._tasks[task_id][1].name != q.name:
                    continue
                found.append((score, task_id))
                taken += 1
        found.sort(reverse=True)
        page = found[:q.limit]
        items = [self._tasks[i][1] for _, i in page]
        nxt = encode_cursor(*page[-1]) if len(page) == q.limit else None
        return Page(items=items, next_cursor=nxt)
