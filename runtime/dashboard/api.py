"""The REST API's handlers: JSON in, JSON out, every error a JSON body with a
message that says what to do (4xx for bad input, 503 when a server is down)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from runtime.dashboard.events import sse
from runtime.dashboard.family import family
from runtime.dashboard.source import BadInput, NotFound, NotSupported, Source, phases_of
from runtime.errors import (
    BrokerConnectionError,
    ConfigError,
    EnqueueError,
    ResultStoreUnavailable,
    TaskloomError,
)
from runtime.messages import TaskOptions

if TYPE_CHECKING:
    from runtime.dashboard.app import Dashboard

__all__ = ["MAX_BODY", "ApiError", "error_response", "routes_table"]

log = structlog.get_logger("taskloom.dashboard")

MAX_BODY = 64 * 1024
_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_HIDDEN = "hidden (this key has the read scope; use an admin key)"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def status_of(e: TaskloomError) -> int:
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, NotSupported):
        return 501
    if isinstance(e, BrokerConnectionError | ResultStoreUnavailable):
        return 503
    if isinstance(e, BadInput | EnqueueError | ConfigError):
        return 422
    return 400


class Submit(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}


class Replay(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    reason: str | None = None
    ids: list[str] | None = None
    dry_run: bool = True
    limit: int = 100


class Purge(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    reason: str | None = None
    ids: list[str] | None = None
    dry_run: bool = False


class CancelFilter(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[str] | None = None
    name: str | None = None
    queue: str | None = None
    dry_run: bool = False


def _check_filter(ids: list[str] | None, *texts: str | None) -> None:
    for t in texts:
        if t is not None and not 1 <= len(t) <= 200:
            raise ApiError(422, "name, reason and queue are 1 to 200 characters; leave one "
                                "out to match any")
    for i in ids or ():
        if not _ID.match(i):
            raise ApiError(422, "each id is 1 to 200 printable characters without spaces")


async def body_of(request: Request, kind: type[Any]) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes; send less (large "
                            "arguments belong in storage the task reads, not in the call)")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes; send less")
    if not data.strip():
        data = b"{}"
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as e:
        raise ApiError(422, f"the body does not fit: {e}; see /api/docs for its schema") from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the body is not JSON ({e}); send a JSON object with "
                            "Content-Type: application/json") from None


def _int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"query parameter {name!r} must be an integer, not {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise ApiError(422, f"query parameter {name!r} must be between {lo} and {hi}")
    return value


def _text(request: Request, name: str, limit: int = 200) -> str | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > limit:
        raise ApiError(422, f"query parameter {name!r} is over {limit} characters")
    return raw


def _path_id(request: Request, key: str = "id") -> str:
    value = str(request.path_params[key])
    if not _ID.match(value):
        raise ApiError(422, f"{key} must be 1 to 200 printable characters without spaces")
    return value


def _hide(request: Request, value: Any) -> Any:
    dash: Dashboard = request.app.state.dashboard
    key = request.scope.get("taskloom_key")
    if not dash.hide_data or key is None or key.scope == "admin":
        return value
    if isinstance(value, list):
        return [_hide(request, v) for v in value]
    if isinstance(value, dict):
        out = {k: (_HIDDEN if k in ("args", "kwargs", "result") else v) for k, v in value.items()}
        error = out.get("error")
        if isinstance(error, dict):
            out["error"] = {**error, "message": _HIDDEN, "traceback": _HIDDEN}
        return out
    return value


def _source(request: Request) -> Source:
    src: Source = request.app.state.dashboard.source
    return src


# -- handlers -------------------------------------------------------------------------------

async def health(request: Request) -> Response:
    ok, checks = await _source(request).health()
    return JSONResponse({"ok": ok, "checks": checks}, status_code=200 if ok else 503)


async def submit(request: Request) -> Response:
    body: Submit = await body_of(request, Submit)
    if not 1 <= len(body.name) <= 200:
        raise ApiError(422, "name must be the task's registered name (1 to 200 characters)")
    try:
        options = msgspec.convert(body.options, TaskOptions, strict=False)
    except msgspec.ValidationError as e:
        raise ApiError(422, f"options: {e}; allowed: {', '.join(TaskOptions.__struct_fields__)}"
                       ) from None
    unknown = set(body.options) - set(TaskOptions.__struct_fields__)
    if unknown:
        raise ApiError(422, f"unknown option(s) {sorted(unknown)}; allowed: "
                            f"{', '.join(TaskOptions.__struct_fields__)}")
    out = await _source(request).submit(body.name, body.args, body.kwargs, options)
    request.app.state.dashboard.watch(out["id"], out["name"], out["queue"])
    return JSONResponse(out, status_code=201)


async def list_tasks(request: Request) -> Response:
    state = _text(request, "state", 40)
    phases_of(state)   # 422 now, before any read, if it names no state
    page = await _source(request).tasks(
        state=state, queue=_text(request, "queue"), name=_text(request, "name"),
        since_ms=_int(request, "since_ms", None, 0, 2**53),
        until_ms=_int(request, "until_ms", None, 0, 2**53), cursor=_text(request, "cursor", 500),
        limit=_int(request, "limit", 50, 1, 500) or 50)
    return JSONResponse(page)


async def get_task(request: Request) -> Response:
    return JSONResponse(_hide(request, await _source(request).task(_path_id(request))))


async def get_family(request: Request) -> Response:
    """The task's parent, root, children and canvas members, from the task index."""
    src = _source(request)
    task_id = _path_id(request)
    out = await family(src.ops, task_id)
    if out is None:
        raise NotFound(f"the task index does not know {task_id!r} (it keeps each state's "
                       "newest tasks for a while); check the id with GET /api/tasks/{id}")
    return JSONResponse(out)


async def cancel_task(request: Request) -> Response:
    return JSONResponse(await _source(request).cancel(_path_id(request)))


async def cancel_tasks(request: Request) -> Response:
    body: CancelFilter = await body_of(request, CancelFilter)
    _check_filter(body.ids, body.name, body.queue)
    return JSONResponse(await _source(request).cancel_many(body.ids, body.name, body.queue,
                                                           dry_run=body.dry_run))


async def retry_task(request: Request) -> Response:
    out = await _source(request).retry(_path_id(request))
    request.app.state.dashboard.watch(out["new_id"], "", "")
    return JSONResponse(out)


async def list_queues(request: Request) -> Response:
    return JSONResponse({"items": await _source(request).queues()})


async def pause_queue(request: Request) -> Response:
    return JSONResponse(await _source(request).pause(_path_id(request, "queue"), True))


async def resume_queue(request: Request) -> Response:
    return JSONResponse(await _source(request).pause(_path_id(request, "queue"), False))


async def dead_letters(request: Request) -> Response:
    items = await _source(request).dead_letters(_path_id(request, "queue"),
                                                _int(request, "limit", 100, 1, 1000) or 100)
    return JSONResponse({"items": _hide(request, items)})


async def replay(request: Request) -> Response:
    body: Replay = await body_of(request, Replay)
    if not 1 <= body.limit <= 1000:
        raise ApiError(422, "limit must be between 1 and 1000")
    _check_filter(body.ids, body.name, body.reason)
    out = await _source(request).replay(_path_id(request, "queue"), name=body.name,
                                        reason=body.reason, ids=body.ids, dry_run=body.dry_run,
                                        limit=body.limit)
    for new in out.get("replayed", []):
        request.app.state.dashboard.watch(new, "", "")
    return JSONResponse(out)


async def purge_dead(request: Request) -> Response:
    body: Purge = await body_of(request, Purge)
    _check_filter(body.ids, body.name, body.reason)
    return JSONResponse(await _source(request).purge_dead(
        _path_id(request, "queue"), name=body.name, reason=body.reason, ids=body.ids,
        dry_run=body.dry_run))


async def workers(request: Request) -> Response:
    """The live workers (each with the tasks it runs now) and the orphans: started
    tasks whose worker's heartbeat is gone."""
    src = _source(request)
    return JSONResponse({"items": await src.workers(),
                         "orphans": _hide(request, await src.orphans())})


async def schedules(request: Request) -> Response:
    return JSONResponse({"items": await _source(request).schedules()})


async def schedule_pause(request: Request) -> Response:
    return JSONResponse(await _source(request).schedule_pause(_path_id(request, "name"), True))


async def schedule_resume(request: Request) -> Response:
    return JSONResponse(await _source(request).schedule_pause(_path_id(request, "name"), False))


async def schedule_trigger(request: Request) -> Response:
    out = await _source(request).schedule_trigger(_path_id(request, "name"))
    request.app.state.dashboard.watch(out["id"], out["name"], out["queue"])
    return JSONResponse(out, status_code=201)


async def events(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    if dash.hub.full:
        raise ApiError(503, "too many live connections to this dashboard; close some tabs or "
                            "try again later")
    receive = dash.hub.subscribe()
    return StreamingResponse(sse(receive, dash.snapshot_events()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def metrics(request: Request) -> Response:
    dash: Dashboard = request.app.state.dashboard
    return Response(dash.metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def routes_table() -> list[tuple[str, str, Any, str]]:
    """(method, path, handler, scope) for every API route."""
    return [
        ("GET", "/api/health", health, "none"),
        ("POST", "/api/tasks", submit, "admin"),
        ("GET", "/api/tasks", list_tasks, "read"),
        ("GET", "/api/tasks/{id}", get_task, "read"),
        ("GET", "/api/tasks/{id}/family", get_family, "read"),
        ("POST", "/api/tasks/cancel", cancel_tasks, "admin"),
        ("POST", "/api/tasks/{id}/cancel", cancel_task, "admin"),
        ("POST", "/api/tasks/{id}/retry", retry_task, "admin"),
        ("GET", "/api/queues", list_queues, "read"),
        ("POST", "/api/queues/{queue}/pause", pause_queue, "admin"),
        ("POST", "/api/queues/{queue}/resume", resume_queue, "admin"),
        ("GET", "/api/queues/{queue}/dead-letters", dead_letters, "read"),
        ("POST", "/api/queues/{queue}/dead-letters/replay", replay, "admin"),
        ("POST", "/api/queues/{queue}/dead-letters/purge", purge_dead, "admin"),
        ("GET", "/api/workers", workers, "read"),
        ("GET", "/api/schedules", schedules, "read"),
        ("POST", "/api/schedules/{name}/pause", schedule_pause, "admin"),
        ("POST", "/api/schedules/{name}/resume", schedule_resume, "admin"),
        ("POST", "/api/schedules/{name}/trigger", schedule_trigger, "admin"),
        ("GET", "/api/events", events, "read"),
        ("GET", "/metrics", metrics, "read"),
    ]
