"""``dashboard_app(rt, api_keys=...)``: the Starlette app that serves the REST
API (/api), the web UI (/), its docs (/api/docs) and metrics (/metrics).

Starlette because it is the small, well-kept ASGI toolkit underneath FastAPI
(routing, streaming responses for server-sent events, static files, a test
transport) with no dependency of its own beyond anyio, which taskloom uses
already; the API's schemas come from msgspec, so FastAPI's pydantic layer
would add weight and a second validation library for nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgspec
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.dashboard import api
from runtime.dashboard.events import EventHub
from runtime.dashboard.keys import ApiKey, KeyRing, load_keys
from runtime.dashboard.metrics import Metrics, MetricsListener
from runtime.dashboard.openapi import docs_html, openapi
from runtime.dashboard.source import Source, event_json, result_json
from runtime.errors import TaskloomError
from runtime.lifecycle import Transition
from runtime.ops.events import TaskEvent

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Dashboard", "dashboard_app"]

log = structlog.get_logger("taskloom.dashboard")

_SNAPSHOT_S = 2.0           # queue/worker snapshots pushed to live pages and gauges
_MAX_WATCHES = 10_000       # submissions whose end this dashboard waits for
_WATCH_S = 24 * 3600.0
_OPEN = ("/api/health", "/api/openapi.json", "/api/docs")
_TRANSITION_FIELDS = frozenset(Transition.__struct_fields__)


class Dashboard:
    """The state one dashboard app shares between requests."""

    def __init__(self, rt: Runtime, keys: KeyRing, *, hide_data: bool) -> None:
        self.rt = rt
        self.keys = keys
        self.hide_data = hide_data
        self.source = Source(rt)
        self.hub = EventHub()
        self.metrics = Metrics()
        self.listener = MetricsListener(self.metrics)
        self.source.listeners.append(self.hub.publish)
        self._tg: anyio.abc.TaskGroup | None = None
        self._watching = 0
        self._last: dict[str, Any] = {"queues": [], "workers": []}
        #: whether the runtime's event stream feeds the live pages and the metrics;
        #: without it (Runtime(events=False)) the dashboard waits on the results of
        #: the tasks it submits and publishes their ends itself
        self.has_events = False

    def snapshot_events(self) -> list[dict[str, Any]]:
        return [{"type": "snapshot", "at_ms": int(time.time() * 1000), **self._last}]

    def watch(self, task_id: str, name: str, queue: str) -> None:
        """Without an event stream: wait (pub/sub, not polling) for the end of
        ``task_id`` (submitted here) and publish it."""
        if self.has_events:
            return
        if self._tg is not None and self._watching < _MAX_WATCHES:
            self._watching += 1
            self._tg.start_soon(self._watch, task_id, name, queue)

    async def _watch(self, task_id: str, name: str, queue: str) -> None:
        try:
            r = await self.source.watch_result(task_id, _WATCH_S)
        finally:
            self._watching -= 1
        if r is None:
            return
        event = {"type": "task", "at_ms": int(time.time() * 1000), **result_json(r)}
        event.pop("result", None)
        event.pop("error", None)
        self.hub.publish(event)

    async def _snapshots(self) -> None:
        while True:
            try:
                queues = await self.source.queues()
                workers = await self.source.workers()
            except (TaskloomError, OSError) as e:
                log.debug("dashboard snapshot failed", error=f"{type(e).__name__}: {e}")
            else:
                self._last = {"queues": queues, "workers": workers}
                self.metrics.set_queues(queues)
                self.metrics.set_workers(workers)
                self.hub.publish(self.snapshot_events()[0])
            await anyio.sleep(_SNAPSHOT_S)

    async def _ops_events(self, stream: AsyncIterator[Any]) -> None:
        """The runtime's event stream (task transitions from every worker, progress,
        worker online/offline) to the live pages; task events also feed the metrics."""
        async for rec in stream:
            self.hub.publish(event_json(rec))
            if isinstance(rec.event, TaskEvent):
                fields = msgspec.structs.asdict(rec.event)
                self.listener.transition(Transition(
                    **{k: v for k, v in fields.items() if k in _TRANSITION_FIELDS}))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Connect the runtime and run the live feeds (the app's lifespan; call it
        from your own lifespan when you mount the app in another service)."""
        async with self.rt:
            self.source.open()
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    stream = self.source.event_stream(None)
                    self.has_events = stream is not None
                    if stream is not None:
                        tg.start_soon(self._ops_events, stream)
                    tg.start_soon(self._snapshots)
                    try:
                        yield
                    finally:
                        self._tg = None
                        tg.cancel_scope.cancel()
            finally:
                await self.source.aclose()


class Auth:
    """Bearer keys on /api and /metrics (read scope; admin for every mutation).
    No cookies are read or set. With no keys, every request is let through."""

    def __init__(self, app: ASGIApp, dash: Dashboard) -> None:
        self.app = app
        self.dash = dash
        self.scopes = {(m, p): s for m, p, _, s in api.routes_table()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        guarded = (path.startswith("/api") or path == "/metrics") and path not in _OPEN
        if guarded and self.dash.keys:
            key, problem = self._key(scope)
            if key is None:
                await api.error_response(401, problem)(scope, receive, send)
                return
            mutating = scope["method"] not in ("GET", "HEAD", "OPTIONS")
            if mutating and key.scope != "admin":
                await api.error_response(403, f"key {key.name!r} has the read scope; this "
                                              "action needs an admin key (taskloom keys add NAME "
                                              "--scope admin)")(scope, receive, send)
                return
            scope["taskloom_key"] = key
        await self.app(scope, receive, send)

    def _key(self, scope: Scope) -> tuple[ApiKey | None, str]:
        header = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                header = v
        if not header:
            return None, ("this endpoint needs an API key: send 'Authorization: Bearer KEY' "
                          "(make one with `taskloom keys add NAME --scope read`)")
        kind, _, token = header.decode("latin-1").partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return None, "send the key as 'Authorization: Bearer KEY'"
        key = self.dash.keys.check(token.strip())
        if key is None:
            return None, "the API key is not valid; check it, or make a new one with `taskloom keys add`"
        return key, ""


def _static_dir() -> str:
    return str(resources.files("runtime.dashboard") / "static")


def dashboard_app(rt: Runtime, *, api_keys: KeyRing | str | os.PathLike[str] | None = None,
                  hide_data_from_read: bool = False) -> Starlette:
    """The dashboard as an ASGI app. ``api_keys``: a key file path or a KeyRing;
    None lets every request through (bind it to 127.0.0.1 only).
    ``hide_data_from_read``: read-scope keys see no task arguments or results."""
    keys = api_keys if isinstance(api_keys, KeyRing) else (
        load_keys(api_keys) if api_keys is not None else KeyRing())
    dash = Dashboard(rt, keys, hide_data=hide_data_from_read)

    def wrap(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except api.ApiError as e:
                return api.error_response(e.status, e.message)
            except TaskloomError as e:
                return api.error_response(api.status_of(e), str(e))
            return response
        return endpoint

    async def page(request: Request) -> Response:
        return HTMLResponse((resources.files("runtime.dashboard") / "static" / "index.html")
                            .read_text(), headers={"Cache-Control": "no-store"})

    async def spec(request: Request) -> Response:
        return JSONResponse(openapi())

    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return api.error_response(405, f"{request.method} is not allowed on {request.url.path}; "
                                           "see /api/docs for the methods")
        return api.error_response(status, f"nothing at {request.url.path}; see /api/docs "
                                          "for the API's paths")

    async def crash(request: Request, exc: Exception) -> Response:
        log.error("dashboard request failed", path=request.url.path,
                  error=f"{type(exc).__name__}: {exc}")
        return api.error_response(500, "the dashboard hit an internal error; see its log "
                                       "and report it")

    routes: list[Any] = [Route(p, wrap(h), methods=[m]) for m, p, h, _ in api.routes_table()]
    routes += [Route("/api/openapi.json", spec), Route("/api/docs", docs), Route("/", page),
               Mount("/static", StaticFiles(directory=_static_dir()), name="static")]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with dash.running():
            yield

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found, Exception: crash})
    app.state.dashboard = dash
    app.add_middleware(Auth, dash=dash)
    return app
