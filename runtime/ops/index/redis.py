"""The task index on Redis, beside the result store.

Keys (``P`` is ``{ns}:ops:{<ns>}:``, one hash tag per namespace)::

    P ix:<state>                zset   task id -> time it entered the state (ms)
    P ix:<state>:q:<queue>      zset   the same, one queue
    P ix:<state>:n:<task name>  zset   the same, one task name
    P t:<id>                    hash   the task's summary (TaskSummary fields), PX max age + 1 day

Writes go through a :class:`runtime.ops.writer.RedisWriter` (its own, or one
shared with the event stream): a batch is one EVALSHA of ``lua/transitions.lua``
per chunk, which per task reads its previous state from its hash, moves the id
between the sorted sets (O(log n)), rewrites the hash, and once per chunk trims
each state's set it touched to its count and age (dropping the trimmed tasks'
hashes and entries), so the index never grows past ``max_per_state`` per state.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import OpsUnavailable, ops_prefix, redis_client
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

__all__ = ["RedisIndex"]

log = structlog.get_logger("taskloom.ops.index")


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

    def _key(self, state: Phase, queue: str | None, name: str | None) -> str:
        base = f"{self.prefix}ix:{state.value}"
        if queue is not None:
            return f"{base}:q:{queue}"
        if name is not None:
            return f"{base}:n:{name}"
        return base

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await fn(*args)
        except Exception as e:
            raise OpsUnavailable(f"could not {what} on {self.url} ({type(e).__name__}: {e}); "
                                 "check that Redis is up") from e

    async def get(self, task_id: str) -> TaskSummary | None:
        raw = await self._call("read a task summary", self._redis.hgetall,
                               f"{self.prefix}t:{task_id}")
        return _summary(raw)

    async def count(self, state: Phase, *, queue: str | None = None,
                    name: str | None = None) -> int:
        return int(await self._call("count the task index", self._redis.zcard,
                                    self._key(state, queue, name)))

    async def query(self, q: Query) -> Page:
        cursor = decode_cursor(q.cursor)
        top = cursor[0] if cursor is not None else "+inf"
        if q.until_ms is not None and (top == "+inf" or q.until_ms < int(top)):
            top = q.until_ms
        low = q.since_ms if q.since_ms is not None else "-inf"
        chunk = max(q.limit, 100)
        found: list[tuple[int, str, TaskSummary]] = []
        for state in states_of(q.states):
            key = self._key(state, q.queue, q.name)
            offset, taken = 0, 0
            while taken < q.limit:
                entries = await self._call("list the task index", self._redis.zrevrangebyscore,
                                           key, top, low, offset, chunk, True)
                offset += len(entries)
                fresh = [(int(sc), m.decode()) for m, sc in entries]
                fresh = [(sc, i) for sc, i in fresh if after(sc, i, cursor)]
                summaries = await self._hydrate([i for _, i in fresh])
                for (sc, i), s in zip(fresh, summaries, strict=True):
                    if s is None or (q.name is not None and s.name != q.name):
                        continue
                    found.append((sc, i, s))
                    taken += 1
                    if taken >= q.limit:
                        break
                if len(entries) < chunk:
                    break
        found.sort(key=lambda x: (x[0], x[1]), reverse=True)
        page = found[: q.limit]
        nxt = encode_cursor(page[-1][0], page[-1][1]) if len(page) == q.limit else None
        return Page(items=[s for _, _, s in page], next_cursor=nxt)

    async def _hydrate(self, ids: list[str]) -> list[TaskSummary | None]:
        if not ids:
            return []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.hgetall(f"{self.prefix}t:{i}")
                raws = await pipe.execute()
        except Exception as e:
            raise OpsUnavailable(f"could not read task summaries on {self.url} "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e
        return [_summary(raw) for raw in raws]


def _summary(raw: dict[bytes, bytes]) -> TaskSummary | None:
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items() if k != b"o"}
    try:
        return msgspec.convert(fields, TaskSummary, strict=False)
    except msgspec.ValidationError as e:
        log.warning("skipping a malformed task summary", error=str(e))
        return None
