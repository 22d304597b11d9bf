"""Worker inspection: who is alive, what state each is in, what each runs now,
and which started tasks belong to no live worker (orphaned until redelivered).

The data is the workers' heartbeats (written by ``runtime.process.liveness``,
which this package may not import): on Redis, one hash per worker
``<namespace>:taskloom:worker:<id>`` with a TTL of a few beats, so a worker
that dies disappears after that timeout; in-process, whatever heartbeat source
the caller passes (``runtime.process.liveness.store_for(rt)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec
import structlog

from runtime.lifecycle import Phase
from runtime.ops.common import OpsUnavailable, redis_client
from runtime.ops.index import Query, TaskIndex, TaskSummary

__all__ = ["HeartbeatSource", "RedisHeartbeats", "RunningTask", "WorkerInfo", "heartbeat_keys",
           "orphans", "roster_key"]

log = structlog.get_logger("taskloom.ops.workers")


class RunningTask(msgspec.Struct, frozen=True, array_like=True):
    """A task a worker runs now (a heartbeat's ``tasks`` entry, JSON ``[id, name, ms]``)."""

    id: str
    name: str
    started_ms: int = 0


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One live worker, as its last heartbeat tells."""

    id: str
    host: str = ""
    pid: int = 0
    queues: list[str] = []
    state: str = "running"
    concurrency: int = 0
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    lag_ms: float = 0.0
    started_ms: int = 0
    last_seen_ms: int = 0
    tasks: list[RunningTask] = []


class HeartbeatSource(Protocol):
    async def list(self) -> Sequence[Any]:
        """The live workers' heartbeats (msgspec Structs with WorkerInfo's fields)."""
        ...


_TASKS = msgspec.json.Decoder(list[RunningTask])


def roster_key(prefix: str) -> str:
    """The sorted set of worker ids beside the heartbeat hashes under ``prefix``
    (``...:taskloom:worker:``), each scored by when its heartbeat expires (ms):
    readers list the live workers without scanning the database."""
    return prefix.removesuffix("worker:") + "workers"


async def heartbeat_keys(redis: Any, prefix: str) -> list[str]:
    """The keys of the live workers' heartbeat hashes, sorted. From the roster; a
    database no roster-keeping worker has written to yet (workers from before the
    roster) is scanned instead."""
    roster = roster_key(prefix)
    ids = await redis.zrangebyscore(roster, int(time.time() * 1000), "+inf")
    if ids or await redis.exists(roster):
        return sorted(prefix + (i.decode() if isinstance(i, bytes) else i) for i in ids)
    return sorted([k.decode() if isinstance(k, bytes) else k
                   async for k in redis.scan_iter(match=prefix + "*", count=500)])


def to_info(beat: Any) -> WorkerInfo:
    data = msgspec.structs.asdict(beat) if isinstance(beat, msgspec.Struct) else dict(beat)
    return msgspec.convert(data, WorkerInfo, strict=False, from_attributes=False)


class RedisHeartbeats:
    """Reads the heartbeat hashes of ``runtime.process.liveness`` on Redis."""

    def __init__(self, url: str, *, namespace: str = "") -> None:
        self.url = url
        self.prefix = f"{namespace}:taskloom:worker:" if namespace else "taskloom:worker:"
        self._redis: Any = redis_client(url)

    async def list(self) -> list[WorkerInfo]:
        try:
            keys = await heartbeat_keys(self._redis, self.prefix)
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                raws = await pipe.execute()
        except Exception as e:
            raise OpsUnavailable(f"could not read worker heartbeats on {self.url} "
                                 f"({type(e).__name__}: {e}); check that Redis is up") from e
        out = []
        for key, raw in zip(keys, raws, strict=True):
            if not raw:
                continue  # expired between SCAN and HGETALL
            fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
            fields["queues"] = [q for q in fields.get("queues", "").split(",") if q]
            try:
                fields["tasks"] = _TASKS.decode(fields["tasks"]) if fields.get("tasks") else []
                out.append(msgspec.convert(fields, WorkerInfo, strict=False))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                log.warning("skipping a malformed heartbeat", key=key, error=str(e))
        return out

    async def aclose(self) -> None:
        await self._redis.aclose()


async def orphans(index: TaskIndex, live: Sequence[WorkerInfo], *, limit: int = 1000
                  ) -> list[TaskSummary]:
    """Started tasks whose worker has no live heartbeat: its process died (or hung
    past its heartbeat TTL) and the broker has not redelivered them yet."""
    alive = {w.id for w in live}
    out: list[TaskSummary] = []
    cursor = None
    while len(out) < limit:
        page = await index.query(Query(states=(Phase.STARTED,), limit=500, cursor=cursor))
        out += [s for s in page.items if s.worker and s.worker not in alive]
        cursor = page.next_cursor
        if cursor is None:
            break
    return out[:limit]


def age_ms(info: WorkerInfo) -> int:
    return int(time.time() * 1000) - info.last_seen_ms
