"""The task index on Redis, beside the result store.

Keys (``P`` is ``{ns}:ops:{<ns>}:``, one hash tag per namespace)::

    P ix:<state>                zset   task id -> time it entered the state (ms)
    P ix:<state>:q:<queue>      zset   the same, one queue
    P ix:<state>:n:<task name>  zset   the same, one task name
    P t:<id>                    hash   the task's summary (TaskSummary fields), PX max age + 1 day

A batch of transitions is one EVALSHA (``lua/index.lua``): per transition it
reads the task's previous state from its hash, moves the id between the sorted
sets (O(log n)), rewrites the hash and trims the state's set to its count and
age (dropping the trimmed tasks' hashes and entries), so the index never grows
past ``max_per_state`` per state.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Any

import anyio
import msgspec
import redis.exceptions as rex
import structlog

from runtime.lifecycle import Phase, Transition
from runtime.ops.common import BatchWriter, OpsUnavailable, now_ms, ops_prefix, redis_client
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
)

__all__ = ["RedisIndex"]

log = structlog.get_logger("taskloom.ops.index")

_SOURCE = (resources.files("runtime.ops") / "lua" / "index.lua").read_text(encoding="utf-8")
_SHA = hashlib.sha1(_SOURCE.encode()).hexdigest()
#: Transitions kept while Redis is away; past it the oldest are dropped (logged).
_MAX_PENDING = 200_000
_JSON = msgspec.json.Encoder()
_ENTERING = {Phase.ENQUEUED: "1", Phase.SCHEDULED: "1", Phase.STARTED: "2"}


def _args(t: Transition, enq: int | None, started: int | None) -> list[str]:
    # strings only: Lua would print big numbers in exponent form
    return [t.id, t.task, t.queue, t.phase.value, str(t.at_ms), str(t.attempt), t.worker,
            "" if t.eta_ms is None else str(t.eta_ms), t.error_type, t.error[:500], t.reason,
            t.parent_id, t.root_id, str(order_of(t)),
            "3" if t.phase.final else _ENTERING.get(t.phase, "0"),
            "" if enq is None else str(enq), "" if started is None else str(started)]


def coalesce(batch: list[Transition]) -> list[tuple[Transition, int | None, int | None]]:
    """One write per task of a batch: its latest step, with the enqueue and start
    times of the steps it replaces (a fast task's three steps often share a batch)."""
    merged: dict[str, list[Any]] = {}
    for t in batch:
        cur = merged.get(t.id)
        if cur is None:
            cur = merged[t.id] = [t, order_of(t), None, None]
        elif (order := order_of(t)) >= cur[1]:
            cur[0], cur[1] = t, order
        if t.phase is Phase.ENQUEUED or t.phase is Phase.SCHEDULED:
            cur[2] = t.at_ms if cur[2] is None else min(cur[2], t.at_ms)
        elif t.phase is Phase.STARTED:
            cur[3] = t.at_ms if cur[3] is None else max(cur[3], t.at_ms)
    return [(t, enq, started) for t, _, enq, started in merged.values()]


class RedisIndex(BatchWriter[Transition]):
    """The task index on Redis: a ``Listener`` that writes in batches from ``serve``."""

    def __init__(self, url: str, *, namespace: str = "",
                 settings: IndexSettings | None = None) -> None:
        super().__init__(log=log, retry_message="could not write the task index; retrying")
        self.url = url
        self.settings = settings or IndexSettings()
        self.prefix = ops_prefix(namespace)
        self._redis: Any = redis_client(url)
        self.dropped = 0

    # -- Listener ------------------------------------------------------------------

    def transition(self, t: Transition, /) -> None:
        pending = self._pending
        pending.append(t)
        if len(pending) > _MAX_PENDING:
            del pending[: len(pending) - _MAX_PENDING]
            self.dropped += 1
        if len(pending) == 1:
            self._wake.set()

    async def aclose(self) -> None:
        try:
            with anyio.move_on_after(5.0, shield=True):
                await self.flush()
        except OpsUnavailable as e:
            log.warning("the task index lost transitions on close", error=str(e),
                        lost=len(self._pending))
        finally:
            with anyio.CancelScope(shield=True):
                await self._redis.aclose()

    # -- writing -------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every pending transition (batches pipelined in one round trip)."""
        while self._pending:
            batch = self._pending[: self.settings.batch * 16]
            s = self.settings
            cutoff = now_ms() - int(s.max_age_s * 1000)
            ttl = int(s.max_age_s * 1000) + 86_400_000
            head = [self.prefix, s.max_per_state, cutoff, ttl]
            try:
                writes = coalesce(batch)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for i in range(0, len(writes), s.batch):
                        rows = _JSON.encode([_args(*w) for w in writes[i:i + s.batch]])
                        pipe.evalsha(_SHA, 0, *head, rows)
                    try:
                        await pipe.execute()
                    except rex.NoScriptError:
                        await self._redis.script_load(_SOURCE)
                        continue
            except Exception as e:
                raise OpsUnavailable(f"the task index on {self.url} cannot be written "
                                     f"({type(e).__name__}: {e}); check that Redis is up") from e
            del self._pending[: len(batch)]

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
