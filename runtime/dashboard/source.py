"""Where the dashboard's data comes from: ``runtime.ops`` when it is there,
else what the core keeps (result store, broker stats and dead letters,
worker heartbeats) and a small index of this process's own submissions.

Every method returns plain JSON-able values; errors are TaskloomError
subclasses that the API maps to 4xx/503. Switch points (when
``runtime.ops.api.Operations`` lands, each fallback below steps aside):
tasks/task index, events, retry, replay, purge, cancel by filter, pause.
"""

from __future__ import annotations

import importlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from runtime import canvas
from runtime.errors import TaskloomError
from runtime.messages import Result, TaskMessage, TaskOptions
from runtime.process.liveness import store_for as liveness_store_for

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["NotFound", "NotSupported", "Source", "BadInput"]

log = structlog.get_logger("taskloom.dashboard")

_LOCAL_MAX = 10_000
_PAGE_READ = 2_000   # the local index is small; the ops index pages for real


class NotFound(TaskloomError, LookupError):
    """What was asked for does not exist (HTTP 404)."""


class BadInput(TaskloomError, ValueError):
    """The request is well-formed but its content is refused (HTTP 422)."""


class NotSupported(TaskloomError):
    """This runtime cannot do that yet (HTTP 501)."""


def _ops_module() -> Any:
    try:
        return importlib.import_module("runtime.ops.api")
    except ImportError:
        return None


def _jsonable(value: Any) -> Any:
    try:
        return msgspec.to_builtins(value, str_keys=True)
    except TypeError:
        return repr(value)


def result_json(r: Result) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "state": r.state.value, "name": r.task, "attempt": r.attempt,
        "delivery_count": r.delivery_count, "worker": r.worker, "started_ms": r.started_ms,
        "finished_ms": r.finished_ms, "result": _jsonable(r.value),
    }
    if r.error is not None:
        out["error"] = {"type": r.error.type, "message": r.error.message,
                        "traceback": r.error.traceback, "reason": r.error.reason}
    return out


class Source:
    """The dashboard's view of one runtime (opened inside ``async with rt``)."""

    def __init__(self, rt: Runtime, *, use_ops: bool = False) -> None:
        self.rt = rt
        # runtime.ops.api.Operations landed while this was written: its calls are not
        # yet checked against the signatures used below, so it is opt-in for now
        ops = _ops_module() if use_ops else None
        self.ops: Any = ops.Operations(rt) if ops is not None and hasattr(ops, "Operations") else None
        self.liveness = liveness_store_for(rt)
        #: tasks submitted through this dashboard: id -> summary (newest last)
        self.local: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.listeners: list[Any] = []   # EventHub.publish-like callables

    # -- helpers ---------------------------------------------------------------------

    def _remember(self, m: TaskMessage) -> None:
        self.local[m.id] = {"id": m.id, "name": m.task, "queue": m.queue, "state": "PENDING",
                            "args": _jsonable(m.args), "kwargs": _jsonable(m.kwargs),
                            "enqueued_ms": int(time.time() * 1000)}
        while len(self.local) > _LOCAL_MAX:
            self.local.popitem(last=False)

    def emit(self, event: dict[str, Any]) -> None:
        for publish in self.listeners:
            publish(event)

    def queue_names(self) -> list[str]:
        names = set(self.rt.registry.queues()) | {self.rt.default_queue}
        names |= {str(t["queue"]) for t in self.local.values()}
        return sorted(names)

    # -- tasks -----------------------------------------------------------------------

    def compile(self, name: str, args: list[Any], kwargs: dict[str, Any],
                options: TaskOptions) -> TaskMessage:
        task = self.rt.registry.get(name)
        if task is not None:
            sig = task.s(*args, **kwargs)   # ArgumentsError if they do not fit
            given = {k: v for k, v in msgspec.structs.asdict(options).items() if v is not None}
            if given:
                sig = sig.set(**given)
            return canvas.message_for(sig)
        # a task this process does not know: sent as given, the worker checks it
        canvas.check_call_options(f"task {name!r}", options)
        queue = options.queue or self.rt.default_queue
        eta_ms = int((time.time() + options.countdown) * 1000) if options.countdown else None
        expires_ms = int((time.time() + options.expires) * 1000) if options.expires else None
        return TaskMessage(id=canvas.new_id(), task=name, args=args, kwargs=kwargs, queue=queue,
                           priority=options.priority or 0, eta_ms=eta_ms, expires_ms=expires_ms,
                           retries=options.retries, timeout=options.timeout)

    async def submit(self, name: str, args: list[Any], kwargs: dict[str, Any],
                     options: TaskOptions) -> dict[str, Any]:
        m = self.compile(name, args, kwargs, options)
        await self.rt.publish([m])
        self._remember(m)
        self.emit({"type": "task", "id": m.id, "name": m.task, "queue": m.queue,
                   "state": "PENDING", "at_ms": int(time.time() * 1000)})
        return {"id": m.id, "name": m.task, "queue": m.queue, "state": "PENDING"}

    async def watch_result(self, task_id: str, timeout_s: float) -> Result | None:
        """The task's terminal result, waiting up to ``timeout_s`` (pub/sub, not polling)."""
        try:
            return await self.rt.results.wait(task_id, timeout_s)
        except TaskloomError:
            return None

    async def task(self, task_id: str) -> dict[str, Any]:
        found = await self.rt.results.get(task_id)
        local = self.local.get(task_id)
        summary: dict[str, Any] = {}
        if self.ops is not None:
            try:
                summary = _jsonable(await self.ops.task(task_id)) or {}
            except TaskloomError:
                summary = {}
        if found is None and local is None and not summary:
            raise NotFound(f"no task {task_id!r} is known (results expire after their TTL); "
                           "check the id, or list tasks with GET /api/tasks")
        out: dict[str, Any] = {"id": task_id, "state": "PENDING"}
        if local is not None:
            out.update(local)
        if isinstance(summary, dict):
            out.update(summary)
        if found is not None:
            out.update(result_json(found))
        return out

    async def tasks(self, *, state: str | None, queue: str | None, name: str | None,
                    since_ms: int | None, until_ms: int | None, cursor: str | None,
                    limit: int) -> dict[str, Any]:
        if self.ops is not None:
            page = await self.ops.tasks(state=state, queue=queue, name=name, since=since_ms,
                                        until=until_ms, cursor=cursor, limit=limit)
            return {"items": _jsonable(page.items), "next_cursor": page.next_cursor}
        items = list(reversed(self.local.values()))
        ids = [t["id"] for t in items]
        results = [await self.rt.results.get(i) for i in ids[:_PAGE_READ]]
        items = items[:_PAGE_READ]
        out = []
        for t, r in zip(items, results, strict=True):
            row = dict(t)
            if r is not None:
                row["state"] = r.state.value
                row["finished_ms"] = r.finished_ms
            row.pop("args", None)
            row.pop("kwargs", None)
            if state and row["state"].lower() != state.lower():
                continue
            if (queue and row["queue"] != queue) or (name and row["name"] != name):
                continue
            if since_ms is not None and row["enqueued_ms"] < since_ms:
                continue
            if until_ms is not None and row["enqueued_ms"] > until_ms:
                continue
            out.append(row)
        start = int(cursor) if cursor and cursor.isdigit() else 0
        page = out[start:start + limit]
        nxt = str(start + limit) if start + limit < len(out) else None
        return {"items": page, "next_cursor": nxt}

    async def cancel(self, task_id: str) -> dict[str, Any]:
        if self.ops is not None:
            return {"id": task_id, "cancelled": bool(_jsonable(await self.ops.cancel(task_id)))}
        cancelled = await self.rt.handle(task_id).cancel()
        self.emit({"type": "task", "id": task_id, "state": "REVOKED",
                   "at_ms": int(time.time() * 1000)})
        return {"id": task_id, "cancelled": cancelled}

    async def retry(self, task_id: str) -> dict[str, Any]:
        """Run a failed task again under a new id (the old id keeps its first result)."""
        if self.ops is not None:
            return {"id": task_id, "retried": _jsonable(await self.ops.retry(task_id))}
        for q in self.queue_names():
            for dl in await self.rt.broker.dead_letters(q, limit=1000):
                if dl.envelope.id == task_id:
                    new = await self._republish(dl.envelope.body, dl.envelope.headers)
                    return {"id": task_id, "new_id": new}
        local = self.local.get(task_id)
        if local is not None:
            m = self.compile(local["name"], list(local["args"]), dict(local["kwargs"]),
                             TaskOptions(queue=local["queue"]))
            await self.rt.publish([m])
            self._remember(m)
            return {"id": task_id, "new_id": m.id}
        raise NotFound(f"task {task_id!r} is neither among the dead letters nor known to this "
                       "dashboard, so its arguments are unknown; submit it again instead")

    async def _republish(self, body: bytes, headers: dict[str, str]) -> str:
        m = self.rt.codec.decode(body, headers)
        m = msgspec.structs.replace(m, id=canvas.new_id(), attempt=1)
        await self.rt.publish([m])
        self._remember(m)
        return m.id

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(self, queue: str, limit: int) -> list[dict[str, Any]]:
        self._check_queue(queue)
        out = []
        for dl in await self.rt.broker.dead_letters(queue, limit=limit):
            row: dict[str, Any] = {"id": dl.envelope.id, "queue": queue, "reason": dl.reason,
                                   "delivery_count": dl.delivery_count}
            try:
                m = self.rt.codec.decode(dl.envelope.body, dl.envelope.headers)
                row.update(name=m.task, args=_jsonable(m.args), kwargs=_jsonable(m.kwargs),
                           attempt=m.attempt)
            except TaskloomError as e:
                row.update(name="", decode_error=str(e))
            out.append(row)
        return out

    async def replay(self, queue: str, *, name: str | None, reason: str | None,
                     ids: list[str] | None, dry_run: bool, limit: int) -> dict[str, Any]:
        self._check_queue(queue)
        if self.ops is not None:
            done = await self.ops.replay(queue, name=name, reason=reason, ids=ids, dry_run=dry_run,
                                         limit=limit)
            return {"queue": queue, "dry_run": dry_run, "result": _jsonable(done)}
        chosen = [d for d in await self.dead_letters(queue, limit)
                  if (not name or d.get("name") == name) and (not reason or d["reason"] == reason)
                  and (not ids or d["id"] in ids) and "decode_error" not in d]
        new_ids: list[str] = []
        if not dry_run:
            by_id = {dl.envelope.id: dl for dl in await self.rt.broker.dead_letters(queue, limit=limit)}
            for d in chosen:
                env = by_id[d["id"]].envelope
                new_ids.append(await self._republish(env.body, env.headers))
        return {"queue": queue, "dry_run": dry_run, "matched": [d["id"] for d in chosen],
                "replayed": new_ids}

    async def purge_dead(self, queue: str) -> dict[str, Any]:
        self._check_queue(queue)
        if self.ops is None or not hasattr(self.ops, "purge_dead"):
            raise NotSupported("purging dead letters needs runtime.ops (the operations module), "
                               "which this installation does not have yet; replay them instead")
        return {"queue": queue, "purged": _jsonable(await self.ops.purge_dead(queue))}

    def _check_queue(self, queue: str) -> None:
        if not queue or len(queue) > 200:
            raise BadInput("a queue name is 1 to 200 characters; see GET /api/queues for the names")

    # -- queues, workers -----------------------------------------------------------------

    async def paused(self) -> set[str]:
        if self.ops is None:
            return set()
        return {str(q) for q in await self.ops.paused()}

    async def queues(self) -> list[dict[str, Any]]:
        paused = await self.paused()
        out = []
        for q in self.queue_names():
            s = await self.rt.broker.stats(q)
            out.append({"name": q, "ready": s.ready, "delayed": s.delayed,
                        "in_flight": s.in_flight, "dead": s.dead, "paused": q in paused})
        return out

    async def pause(self, queue: str, paused: bool) -> dict[str, Any]:
        self._check_queue(queue)
        if self.ops is None:
            raise NotSupported("pausing a queue needs runtime.ops (the operations module), which "
                               "this installation does not have yet")
        await (self.ops.pause(queue) if paused else self.ops.resume(queue))
        return {"queue": queue, "paused": paused}

    async def workers(self) -> list[dict[str, Any]]:
        if self.ops is not None and hasattr(self.ops, "workers"):
            return list(_jsonable(await self.ops.workers()))
        return [msgspec.to_builtins(b) for b in await self.liveness.list()]

    # -- schedules ------------------------------------------------------------------------

    def _schedules(self) -> Any:
        from runtime.ops.scheduler.api import schedules_for

        return schedules_for(self.rt)

    async def schedules(self) -> list[dict[str, Any]]:
        return list(_jsonable(await self._schedules().list()))

    async def schedule_pause(self, name: str, paused: bool) -> dict[str, Any]:
        from runtime.ops.scheduler.api import ScheduleNotFound

        s = self._schedules()
        try:
            await (s.pause(name) if paused else s.resume(name))
        except ScheduleNotFound as e:
            raise NotFound(str(e)) from None
        return {"name": name, "paused": paused}

    async def schedule_trigger(self, name: str) -> dict[str, Any]:
        s = self._schedules()
        async with s.store:
            _, defs, _ = await s.store.load()
        d = defs.get(name)
        if d is None:
            raise NotFound(f"no schedule named {name!r}; see GET /api/schedules for the names")
        opts = msgspec.convert(d.options, TaskOptions) if d.options else TaskOptions()
        out = await self.submit(d.task, list(d.args), dict(d.kwargs), opts)
        return {"name": name, **out}

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ok = True
        with anyio.move_on_after(5.0) as scope:
            try:
                await self.rt.broker.stats(self.rt.default_queue)
                checks["broker"] = "ok"
            except Exception as e:  # any failure is a health answer, not a crash
                checks["broker"] = f"{type(e).__name__}: {e}"
                ok = False
            try:
                await self.rt.results.get("taskloom-health-probe")
                checks["results"] = "ok"
            except Exception as e:
                checks["results"] = f"{type(e).__name__}: {e}"
                ok = False
            try:
                checks["workers"] = len(await self.liveness.list())
            except Exception as e:
                checks["workers"] = f"{type(e).__name__}: {e}"
                ok = False
        if scope.cancelled_caught:
            checks["timeout"] = "a check took over 5 s"
            ok = False
        return ok, checks

    async def event_stream(self, since: str | None) -> AsyncIterator[dict[str, Any]] | None:
        """The ops event stream, if runtime.ops has one (else None: the hub serves)."""
        if self.ops is None or not hasattr(self.ops, "events"):
            return None
        stream: AsyncIterator[dict[str, Any]] = self.ops.events(since=since)
        return stream
