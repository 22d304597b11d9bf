"""Where the dashboard's data comes from: ``runtime.ops.api.Operations`` (the
task index, the event stream, worker heartbeats, the operator's verbs) and
the core (result store, broker stats and dead letters).

Every method returns plain JSON-able values; errors are TaskloomError
subclasses that the API maps to 4xx/503. States are shown in the result
store's words (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, EXPIRED);
the index's own step is kept beside them as ``phase``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from runtime import canvas
from runtime.errors import TaskloomError
from runtime.lifecycle import Phase
from runtime.messages import Result, TaskMessage, TaskOptions
from runtime.ops.api import Operations
from runtime.ops.events import EventRecord
from runtime.ops.verbs import PENDING as CANCELLABLE
from runtime.ops.verbs import NothingToRetry, retry_id

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["BadInput", "NotFound", "NotSupported", "Source", "display_state", "phases_of"]

log = structlog.get_logger("taskloom.dashboard")

_LOCAL_MAX = 10_000   # arguments of the tasks submitted here, for their detail page
CANCEL_MAX = 100_000  # tasks one cancel by filter tries at most (runtime.ops.verbs.cancel's limit)

#: the index's phases in the result store's words (what the UI shows)
_DISPLAY = {Phase.ENQUEUED: "PENDING", Phase.SCHEDULED: "PENDING", Phase.STARTED: "STARTED",
            Phase.RETRYING: "RETRY", Phase.SUCCEEDED: "SUCCESS", Phase.FAILED: "FAILURE",
            Phase.DEAD_LETTERED: "FAILURE", Phase.REVOKED: "REVOKED", Phase.EXPIRED: "EXPIRED"}
#: a ``state`` filter in either vocabulary -> the index's phases
_FILTER: dict[str, tuple[Phase, ...]] = {
    "pending": (Phase.ENQUEUED, Phase.SCHEDULED), "retry": (Phase.RETRYING,),
    "success": (Phase.SUCCEEDED,), "failure": (Phase.FAILED, Phase.DEAD_LETTERED),
    **{p.value: (p,) for p in Phase}}
_RANK = {"PENDING": 0, "STARTED": 1, "RETRY": 2}


class NotFound(TaskloomError, LookupError):
    """What was asked for does not exist (HTTP 404)."""


class BadInput(TaskloomError, ValueError):
    """The request is well-formed but its content is refused (HTTP 422)."""


class NotSupported(TaskloomError):
    """This runtime cannot do that (HTTP 501)."""


def display_state(phase: str) -> str:
    try:
        return _DISPLAY[Phase(phase)]
    except ValueError:
        return phase.upper()


def phases_of(state: str | None) -> tuple[Phase, ...] | None:
    """The phases a ``state`` filter names (None: any); BadInput if unknown."""
    if state is None:
        return None
    found = _FILTER.get(state.lower())
    if found is None:
        raise BadInput(f"state must be one of {', '.join(sorted(_FILTER))} (any case)")
    return found


def _jsonable(value: Any) -> Any:
    try:
        return msgspec.to_builtins(value, str_keys=True)
    except TypeError:
        return repr(value)


def summary_json(summary: Any) -> dict[str, Any]:
    """A TaskSummary as the API shows it (``state`` in the UI's words, ``phase`` as kept)."""
    out: dict[str, Any] = _jsonable(summary)
    out["phase"] = out["state"]
    out["state"] = display_state(out["state"])
    return out


def event_json(rec: EventRecord) -> dict[str, Any]:
    """One ops event as the live feed sends it (``type`` = the event's kind)."""
    out: dict[str, Any] = {"id": rec.id, **msgspec.to_builtins(rec.event)}
    out["event_id"] = rec.id
    out["type"] = out.get("kind", "message")
    if out["type"] == "task":
        out["name"] = out.get("task", "")
        out["state"] = display_state(str(out.get("phase", "")))
    return out


def worker_json(info: Any) -> dict[str, Any]:
    out: dict[str, Any] = _jsonable(info)
    out["tasks"] = [{"id": t.id, "name": t.name, "started_ms": t.started_ms}
                    for t in getattr(info, "tasks", [])]
    return out


def result_json(r: Result) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": r.id, "state": r.state.value, "name": r.task, "attempt": r.attempt,
        "delivery_count": r.delivery_count, "worker": r.worker, "started_ms": r.started_ms,
        "finished_ms": r.finished_ms, "result": _jsonable(r.value), "meta": _jsonable(r.meta),
    }
    if r.progress is not None:
        out["progress"] = _jsonable(r.progress)
    if r.error is not None:
        out["error"] = {"type": r.error.type, "message": r.error.message,
                        "traceback": r.error.traceback, "reason": r.error.reason}
    return out


def _drop_nones(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class Source:
    """The dashboard's view of one runtime: ``open()`` inside ``async with rt``
    (the runtime's listeners exist then), ``aclose()`` before it closes."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._ops: Operations | None = None
        #: tasks submitted through this dashboard: id -> their arguments (newest last)
        self.local: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.listeners: list[Any] = []   # EventHub.publish-like callables

    def open(self) -> None:
        self._ops = Operations(self.rt)

    async def aclose(self) -> None:
        ops, self._ops = self._ops, None
        if ops is not None:
            await ops.aclose()

    @property
    def ops(self) -> Operations:
        if self._ops is None:
            raise NotSupported("the dashboard is not running: serve its app (its lifespan "
                               "opens the runtime), or enter Dashboard.running()")
        return self._ops

    # -- helpers ---------------------------------------------------------------------

    def _remember(self, m: TaskMessage) -> None:
        self.local[m.id] = {"args": _jsonable(m.args), "kwargs": _jsonable(m.kwargs)}
        while len(self.local) > _LOCAL_MAX:
            self.local.popitem(last=False)

    def emit(self, event: dict[str, Any]) -> None:
        for publish in self.listeners:
            publish(event)

    def queue_names(self) -> list[str]:
        return sorted(set(self.rt.registry.queues()) | {self.rt.default_queue})

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
        return {"id": m.id, "name": m.task, "queue": m.queue, "state": "PENDING"}

    async def watch_result(self, task_id: str, timeout_s: float) -> Result | None:
        """The task's terminal result, waiting up to ``timeout_s`` (pub/sub, not polling)."""
        try:
            return await self.rt.results.wait(task_id, timeout_s)
        except TaskloomError:
            return None

    async def task(self, task_id: str) -> dict[str, Any]:
        """What the index, the result store and this dashboard know of one task:
        state, progress, meta, result or error, its attempts, timings, worker, parent."""
        found = await self.rt.results.get(task_id)
        summary = await self.ops.task(task_id)
        local = self.local.get(task_id)
        if found is None and local is None and summary is None:
            raise NotFound(f"no task {task_id!r} is known (results expire after their TTL); "
                           "check the id, or list tasks with GET /api/tasks")
        out: dict[str, Any] = {"id": task_id, "state": "PENDING"}
        if local is not None:
            out.update(local)
        if summary is not None:
            out.update(_drop_nones(summary_json(summary)))
        if found is not None:
            # the later of the two steps wins: the store's record is the truth once it
            # is final, before that either side may be a flush behind the other
            result = _drop_nones(result_json(found))
            if _RANK.get(result["state"], 3) < _RANK.get(out["state"], 3):
                result.pop("state")
            out.update(result)
        out["attempts"] = self._attempts(out)
        retried = await self.ops.task(retry_id(task_id))
        if retried is not None:
            out["retried_as"] = retried.id
        return out

    @staticmethod
    def _attempts(t: dict[str, Any]) -> list[dict[str, Any]]:
        """The attempts as far as the index and the store keep them: each earlier one
        ended in a retry; the last has the current timings and state."""
        n = int(t.get("attempt") or 1)
        earlier: list[dict[str, Any]] = [{"attempt": i, "state": "RETRY"} for i in range(1, n)]
        return [*earlier, {"attempt": n, "state": t.get("state"), "worker": t.get("worker", ""),
                           "started_ms": t.get("started_ms"), "finished_ms": t.get("finished_ms")}]

    async def tasks(self, *, state: str | None, queue: str | None, name: str | None,
                    since_ms: int | None, until_ms: int | None, cursor: str | None,
                    limit: int) -> dict[str, Any]:
        page = await self.ops.tasks(state=phases_of(state) or None, queue=queue, name=name,
                                    since=since_ms, until=until_ms, cursor=cursor, limit=limit)
        return {"items": [summary_json(s) for s in page.items], "next_cursor": page.next_cursor}

    async def cancel(self, task_id: str) -> dict[str, Any]:
        report = await self.ops.cancel(task_id)
        if report.revoked:
            self.emit({"type": "task", "id": task_id, "state": "REVOKED", "phase": "revoked",
                       "at_ms": int(time.time() * 1000)})
        return {"id": task_id, "cancelled": report.revoked > 0}

    async def cancel_many(self, ids: list[str] | None, name: str | None,
                          queue: str | None, *, dry_run: bool = False) -> dict[str, Any]:
        """Cancel the tasks ``ids``, or every pending one of task ``name`` / ``queue``
        (``dry_run``: only count the tasks a cancel would try, and change nothing)."""
        if dry_run:
            return {"matched": await self._cancel_matches(ids, name, queue), "revoked": 0,
                    "unchanged": 0, "dry_run": True}
        report = await self.ops.cancel(ids or (), name=name, queue=queue)
        return {"matched": report.matched, "revoked": report.revoked,
                "unchanged": report.unchanged, "dry_run": False}

    async def _cancel_matches(self, ids: list[str] | None, name: str | None,
                              queue: str | None) -> int:
        """How many tasks ``ops.cancel`` would try: the ids, and the pending tasks of
        the name or queue (counted from the index's sets when one filter is given,
        else listed as cancel lists them)."""
        if not ids and name is None and queue is None:
            raise BadInput("cancel needs ids, a task name or a queue: with none it would "
                           "cancel nothing (or everything)")
        if name is None and queue is None:
            return len(set(ids or ()))
        if not ids and (name is None) != (queue is None):
            counts = [await self.ops.count(p, name=name, queue=queue) for p in CANCELLABLE]
            return min(sum(counts), CANCEL_MAX)
        found = set(ids or ())
        cursor = None
        while len(found) < CANCEL_MAX:
            page = await self.ops.tasks(state=CANCELLABLE, name=name, queue=queue, limit=500,
                                        cursor=cursor)
            found.update(s.id for s in page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        return min(len(found), CANCEL_MAX)

    async def retry(self, task_id: str) -> dict[str, Any]:
        """Run a failed or dead-lettered task again from its dead letter, under the id
        ``retry_id(task_id)`` (the old id keeps its first result)."""
        try:
            report = await self.ops.retry(task_id)
        except NothingToRetry as e:
            raise NotFound(str(e)) from None
        if task_id in self.local:
            self.local[report.new_id] = self.local[task_id]
        return {"id": task_id, "new_id": report.new_id, "retried": report.retried}

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
        """Publish again the matching dead letters (``dry_run``: only say which); each
        runs under ``retry_id(its id)``."""
        self._check_queue(queue)
        chosen = [d for d in await self.dead_letters(queue, limit)
                  if (not name or d.get("name") == name) and (not reason or d["reason"] == reason)
                  and (not ids or d["id"] in ids)]
        matched = [d["id"] for d in chosen]
        if not matched:  # ids=[] would mean "no id filter" to ops.replay: replay nothing
            return {"queue": queue, "dry_run": dry_run, "matched": [], "replayed": [],
                    "undecodable": 0}
        report = await self.ops.replay(queue, ids=matched, limit=limit, dry_run=dry_run)
        replayed = [] if dry_run or not matched else [
            retry_id(d["id"]) for d in chosen if "decode_error" not in d]
        return {"queue": queue, "dry_run": dry_run, "matched": matched, "replayed": replayed,
                "undecodable": report.undecodable}

    async def purge_dead(self, queue: str, *, name: str | None, reason: str | None,
                         ids: list[str] | None, dry_run: bool) -> dict[str, Any]:
        self._check_queue(queue)
        report = await self.ops.purge_dead(queue, name=name, reason=reason, ids=ids,
                                           dry_run=dry_run)
        return {"queue": queue, "dry_run": dry_run, "matched": report.matched,
                "purged": report.done}

    def _check_queue(self, queue: str) -> None:
        if not queue or len(queue) > 200:
            raise BadInput("a queue name is 1 to 200 characters; see GET /api/queues for the names")

    # -- queues, workers -----------------------------------------------------------------

    async def queues(self) -> list[dict[str, Any]]:
        paused = await self.ops.paused()
        names = sorted(set(self.queue_names()) | paused)
        out = []
        for q in names:
            s = await self.rt.broker.stats(q)
            out.append({"name": q, "ready": s.ready, "delayed": s.delayed,
                        "in_flight": s.in_flight, "dead": s.dead, "paused": q in paused})
        return out

    async def pause(self, queue: str, paused: bool) -> dict[str, Any]:
        self._check_queue(queue)
        changed = await (self.ops.pause(queue) if paused else self.ops.resume(queue))
        return {"queue": queue, "paused": paused, "changed": changed}

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers, each with the tasks it runs now."""
        return [worker_json(w) for w in await self.ops.workers()]

    async def orphans(self, limit: int = 100) -> list[dict[str, Any]]:
        """Started tasks whose worker is gone (until the broker redelivers them)."""
        return [summary_json(s) for s in await self.ops.orphans(limit=limit)]

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
                checks["workers"] = len(await self.ops.workers())
            except Exception as e:
                checks["workers"] = f"{type(e).__name__}: {e}"
                ok = False
        if scope.cancelled_caught:
            checks["timeout"] = "a check took over 5 s"
            ok = False
        return ok, checks

    def event_stream(self, since: str | None) -> AsyncIterator[EventRecord] | None:
        """The ops event stream after ``since`` (None when the runtime keeps no events)."""
        try:
            return self.ops.events(since=since)
        except TaskloomError as e:
            log.info("the dashboard's live feed has no event stream", why=str(e))
            return None
