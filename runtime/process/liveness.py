"""Worker liveness: each worker process publishes a heartbeat every few seconds.

A heartbeat says who the worker is (id, host, pid, queues, concurrency), what
it is doing (state: starting, running, draining, stopped; the tasks it runs
now, each with its id, name and start time), how busy it is (in flight,
processed, failed, the largest event-loop lag since the last beat) and when it
started and was last seen. Heartbeats run on the event
loop beside the worker, independent of task code, and expire when they stop.

Where they go: to Redis when the runtime's broker (or result store) is Redis
(one hash per worker, ``<namespace>:taskloom:worker:<id>``, with a TTL of a
few intervals; every field a string, ``queues`` comma-joined, ``tasks`` JSON;
and the worker's id in the sorted set ``<namespace>:taskloom:workers`` scored by
when its heartbeat expires, so readers never scan the database),
else to an in-memory store of the runtime (seen only inside the process). ``taskloom status APP`` lists them.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec
import structlog

from runtime.ops.api import events_of, use_heartbeats
from runtime.ops.events import WorkerEvent
from runtime.ops.workers import RunningTask, heartbeat_keys, roster_key

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.process.lag import LagMonitor
    from runtime.worker import Worker

__all__ = [
    "MAX_TASKS_LISTED",
    "Heartbeat",
    "LivenessStore",
    "MemoryLivenessStore",
    "RedisLivenessStore",
    "RunningTask",
    "heartbeat_of",
    "publish_heartbeats",
    "store_for",
]

log = structlog.get_logger("taskloom.liveness")

_REDIS_SCHEMES = ("redis", "rediss", "unix")


#: A heartbeat lists at most this many running tasks (``in_flight`` has the count).
MAX_TASKS_LISTED = 200


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int = 0
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    #: the largest event-loop lag since the previous heartbeat
    lag_ms: float = 0.0
    started_ms: int = 0
    last_seen_ms: int = 0
    #: starting, running, draining or stopped
    state: str = "running"
    tasks: list[RunningTask] = []


class LivenessStore(Protocol):
    async def put(self, beat: Heartbeat, ttl_s: float) -> None: ...

    async def remove(self, worker_id: str) -> None: ...

    async def list(self) -> list[Heartbeat]:
        """The live workers (heartbeats not yet expired), by id."""
        ...

    async def aclose(self) -> None: ...


class MemoryLivenessStore:
    """Heartbeats of the workers of one process."""

    def __init__(self) -> None:
        self._beats: dict[str, tuple[float, Heartbeat]] = {}

    async def put(self, beat: Heartbeat, ttl_s: float) -> None:
        self._beats[beat.id] = (time.monotonic() + ttl_s, beat)

    async def remove(self, worker_id: str) -> None:
        self._beats.pop(worker_id, None)

    async def list(self) -> list[Heartbeat]:
        now = time.monotonic()
        for key in [k for k, (due, _) in self._beats.items() if due <= now]:
            del self._beats[key]
        return [beat for _, beat in sorted(self._beats.values(), key=lambda x: x[1].id)]

    async def aclose(self) -> None:
        return None


class RedisLivenessStore:
    """One hash per worker with a TTL, under the runtime's namespace."""

    def __init__(self, url: str, *, namespace: str = "") -> None:
        import redis.asyncio

        self.url = url
        self.prefix = f"{namespace}:taskloom:worker:" if namespace else "taskloom:worker:"
        self._roster = roster_key(self.prefix)
        # RESP2: with RESP3 redis-py 8.1 sends on a pooled connection the server
        # closed (redis-py#4252), so the first beat after a Redis restart failed
        self._redis: Any = redis.asyncio.Redis.from_url(url, socket_timeout=5.0,
                                                        socket_connect_timeout=5.0, protocol=2)

    def _key(self, worker_id: str) -> str:
        return self.prefix + worker_id

    async def put(self, beat: Heartbeat, ttl_s: float) -> None:
        fields = {k: ",".join(v) if isinstance(v, list) else str(v)
                  for k, v in msgspec.structs.asdict(beat).items() if k != "tasks"}
        fields["tasks"] = _TASKS_ENC.encode(beat.tasks).decode()
        key = self._key(beat.id)
        ttl_ms = max(1, int(ttl_s * 1000))
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(self._roster, {beat.id: now_ms + ttl_ms})
            pipe.zremrangebyscore(self._roster, "-inf", now_ms)  # the dead leave the roster
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(worker_id))
            pipe.zrem(self._roster, worker_id)
            await pipe.execute()

    async def list(self) -> list[Heartbeat]:
        beats = []
        for key in await heartbeat_keys(self._redis, self.prefix):
            raw = await self._redis.hgetall(key)
            if not raw:
                continue
            fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
            fields["queues"] = [q for q in fields.get("queues", "").split(",") if q]
            fields["tasks"] = _tasks_of(fields.get("tasks", ""))
            try:
                beats.append(msgspec.convert(fields, Heartbeat, strict=False))
            except msgspec.ValidationError as e:
                log.warning("skipping a malformed heartbeat", key=key, error=str(e))
        return beats

    async def aclose(self) -> None:
        await self._redis.aclose()


_TASKS_ENC = msgspec.json.Encoder()
_TASKS_DEC = msgspec.json.Decoder(list[RunningTask])


def _tasks_of(text: str) -> list[RunningTask]:
    if not text:
        return []  # a heartbeat of a worker before tasks were listed
    try:
        return _TASKS_DEC.decode(text)
    except msgspec.MsgspecError:
        return []


_memory_stores: weakref.WeakKeyDictionary[Runtime, MemoryLivenessStore] = (
    weakref.WeakKeyDictionary())


def _redis_url_of(rt: Runtime) -> str | None:
    # the broker's and store's own URLs: without the taskloom options of the query
    for owner in (rt.broker, rt.results):
        url = getattr(owner, "url", None)
        if isinstance(url, str) and urlsplit(url).scheme.lower() in _REDIS_SCHEMES:
            return url
    return None


def _namespace_of(rt: Runtime) -> str:
    return rt.namespace


def store_for(rt: Runtime) -> LivenessStore:
    """Redis when the runtime uses Redis, else the runtime's memory store."""
    url = _redis_url_of(rt)
    if url is not None:
        return RedisLivenessStore(url, namespace=_namespace_of(rt))
    store = _memory_stores.get(rt)
    if store is None:
        store = _memory_stores[rt] = MemoryLivenessStore()
        use_heartbeats(rt, store)  # Operations(rt).workers() reads it
    return store


def _running_tasks(worker: Worker) -> list[RunningTask]:
    """What ``worker`` runs now: its ``running`` map (id -> (name, started_ms)),
    else its ``running_tasks()`` ((id, name, started_ms) tuples), else the
    process's running messages (no start time)."""
    mapped = getattr(worker, "running", None)
    if isinstance(mapped, Mapping):
        return [RunningTask(i, n, int(ms))
                for i, (n, ms) in list(mapped.items())[:MAX_TASKS_LISTED]]
    listed = getattr(worker, "running_tasks", None)
    if callable(listed):
        return [RunningTask(i, n, int(ms)) for i, n, ms in list(listed())[:MAX_TASKS_LISTED]]
    from runtime.execution import running

    return [RunningTask(m.id, m.task) for m in list(running.values())[:MAX_TASKS_LISTED]]


def _state_of(worker: Worker, state: str | None) -> str:
    if state is not None:
        return state
    value = getattr(worker, "state", None)
    return str(getattr(value, "value", value)) if value is not None else "running"


def heartbeat_of(worker: Worker, *, started_ms: int, lag: LagMonitor | None = None,
                 queues: Sequence[str] | None = None, state: str | None = None) -> Heartbeat:
    return Heartbeat(
        id=worker.name, host=socket.gethostname(), pid=os.getpid(),
        queues=list(queues if queues is not None else worker.queues),
        concurrency=worker.concurrency, in_flight=worker.in_flight,
        processed=worker.processed, failed=worker.failed,
        lag_ms=round(lag.take_max() * 1000, 1) if lag is not None else 0.0,
        started_ms=started_ms, last_seen_ms=int(time.time() * 1000),
        state=_state_of(worker, state), tasks=_running_tasks(worker))


def _event(beat: Heartbeat, what: Literal["online", "heartbeat", "offline"]) -> WorkerEvent:
    return WorkerEvent(worker=beat.id, what=what, at_ms=beat.last_seen_ms, state=beat.state,
                       in_flight=beat.in_flight, processed=beat.processed, failed=beat.failed,
                       lag_ms=beat.lag_ms)


async def publish_heartbeats(
    store: LivenessStore,
    worker: Worker,
    *,
    interval_s: float = 5.0,
    ttl_s: float | None = None,
    lag: LagMonitor | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Publish ``worker``'s heartbeat every ``interval_s`` until cancelled, then
    remove it; with the runtime's event stream open (``runtime.ops``), also a
    worker event: online, then heartbeat each beat, offline at the end. A store
    that is down is logged and tried again next beat."""
    ttl = ttl_s if ttl_s is not None else interval_s * 3
    started_ms = int(time.time() * 1000)
    stream = events_of(worker.runtime)
    what: Literal["online", "heartbeat", "offline"] = "online"
    task_status.started()
    failing_since: float | None = None  # one log line per outage, not one per beat
    try:
        while True:
            beat = heartbeat_of(worker, started_ms=started_ms, lag=lag)
            if stream is not None:
                stream.publish(_event(beat, what))
                what = "heartbeat"
            try:
                with anyio.fail_after(max(interval_s, 1.0)):
                    await store.put(beat, ttl)
            except Exception as e:  # redis errors, timeouts: never stop the worker
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("could not publish a heartbeat; retrying every beat (the "
                                "next line says when it works again)", worker=worker.name,
                                error=f"{type(e).__name__}: {e}")
                else:
                    log.debug("could not publish a heartbeat", worker=worker.name,
                              error=f"{type(e).__name__}: {e}")
            else:
                if failing_since is not None:
                    log.warning("heartbeats are published again", worker=worker.name,
                                failed_for_s=round(time.monotonic() - failing_since, 2))
                    failing_since = None
            await anyio.sleep(interval_s)
    finally:
        if stream is not None:
            stream.publish(_event(heartbeat_of(worker, started_ms=started_ms, state="stopped"),
                                  "offline"))
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                await store.remove(worker.name)
            except Exception as e:
                log.debug("could not remove a heartbeat", worker=worker.name, error=str(e))
