"""The OpenAPI 3 document of the REST API (served at /api/openapi.json), and a
small HTML page listing it (/api/docs; no CDN, no script)."""

from __future__ import annotations

import html
from typing import Any

from runtime.dashboard.api import MAX_BODY, routes_table

__all__ = ["docs_html", "openapi"]

_STR = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "^[!-~]+$"}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"},
                                            "status": {"type": "integer"}},
          "required": ["error", "status"]}
_OBJ = {"type": "object"}
_SUMMARY = {
    "/api/health": "Brokers and stores reachable, workers alive (200) or not (503)",
    "/api/tasks": "Tasks: GET lists (filters, cursor pages); POST submits one by name",
    "/api/tasks/{id}": "One task: state, result or error with traceback, attempts, timings",
    "/api/tasks/{id}/family": "A task's parent, root, children and canvas members (index)",
    "/api/tasks/cancel": "Cancel tasks by ids, or every pending one of a task name or queue "
                         "(dry_run: only count them)",
    "/api/tasks/{id}/cancel": "Cancel a task",
    "/api/tasks/{id}/retry": "Run a failed task again from its dead letter, under a new id",
    "/api/queues": "Queues: depths by state, paused",
    "/api/queues/{queue}/pause": "Pause a queue",
    "/api/queues/{queue}/resume": "Resume a queue",
    "/api/queues/{queue}/dead-letters": "Dead letters of a queue",
    "/api/queues/{queue}/dead-letters/replay": "Replay dead letters by filter (dry_run first)",
    "/api/queues/{queue}/dead-letters/purge": "Delete a queue's dead letters (by filter)",
    "/api/workers": "Workers: heartbeats, running tasks, totals, loop lag; orphaned tasks",
    "/api/schedules": "Schedules: rule, next and last run, paused",
    "/api/schedules/{name}/pause": "Pause a schedule",
    "/api/schedules/{name}/resume": "Resume a schedule",
    "/api/schedules/{name}/trigger": "Run a schedule's task now",
    "/api/events": "Server-sent events: task transitions and queue/worker snapshots",
    "/metrics": "Prometheus metrics (text format)",
}
_SUBMIT = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "args": {"type": "array"}, "kwargs": {"type": "object"},
    "options": {"type": "object", "additionalProperties": False, "properties": {
        "queue": {"type": "string"}, "priority": {"type": "integer"},
        "countdown": {"type": "number"}, "expires": {"type": "number"},
        "retries": {"type": "integer"}, "timeout": {"type": "number"}}}}}
_REPLAY = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "reason": {"type": "string"},
    "ids": {"type": "array", "items": {"type": "string"}},
    "dry_run": {"type": "boolean", "default": True},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000}}}
_PURGE = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "reason": {"type": "string"},
    "ids": {"type": "array", "items": {"type": "string"}},
    "dry_run": {"type": "boolean", "default": False}}}
_CANCEL = {"type": "object", "additionalProperties": False, "properties": {
    "ids": {"type": "array", "items": {"type": "string"}},
    "name": {"type": "string"}, "queue": {"type": "string"},
    "dry_run": {"type": "boolean", "default": False}}}
_BODIES = {("POST", "/api/tasks"): _SUBMIT, ("POST", "/api/tasks/cancel"): _CANCEL,
           ("POST", "/api/queues/{queue}/dead-letters/replay"): _REPLAY,
           ("POST", "/api/queues/{queue}/dead-letters/purge"): _PURGE}
_LIST_PARAMS = [
    {"name": "state", "in": "query", "schema": {"type": "string"}},
    {"name": "queue", "in": "query", "schema": {"type": "string", "maxLength": 200}},
    {"name": "name", "in": "query", "schema": {"type": "string", "maxLength": 200}},
    {"name": "since_ms", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {"name": "until_ms", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "maxLength": 500}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
]


def _operation(method: str, path: str, scope: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": _SUMMARY.get(path, path), "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": _OBJ}}},
        "default": {"description": "An error: what went wrong and what to do",
                    "content": {"application/json": {"schema": _ERROR}}}}}
    if scope != "none":
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs a key with the {scope} scope."
    params: list[dict[str, Any]] = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": _STR}
              for p in path.split("/") if p.startswith("{")]
    if path == "/api/tasks" and method == "GET":
        params += _LIST_PARAMS
    if path.endswith("/dead-letters"):
        params.append({"name": "limit", "in": "query",
                       "schema": {"type": "integer", "minimum": 1, "maximum": 1000}})
    if params:
        op["parameters"] = params
    body = _BODIES.get((method, path))
    if body is not None:
        op["requestBody"] = {"required": path == "/api/tasks", "content": {
            "application/json": {"schema": body}}}
    if method == "POST" and path in ("/api/tasks", "/api/schedules/{name}/trigger"):
        op["responses"]["201"] = op["responses"].pop("200")
    if path in ("/api/events", "/metrics"):
        kind = "text/event-stream" if path == "/api/events" else "text/plain"
        op["responses"]["200"] = {"description": "OK", "content": {kind: {"schema": {
            "type": "string"}}}}
    return op


def openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, _, scope in routes_table():
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, scope)
    return {
        "openapi": "3.0.3",
        "info": {"title": "taskloom dashboard API", "version": "1",
                 "description": f"Bearer API keys (`taskloom keys add`); request bodies up to "
                                f"{MAX_BODY} bytes; errors are JSON with what to do."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def docs_html() -> str:
    rows = []
    for method, path, _, scope in routes_table():
        rows.append(f"<tr><td><code>{method}</code></td><td><code>{html.escape(path)}</code></td>"
                    f"<td>{html.escape(scope)}</td><td>{html.escape(_SUMMARY.get(path, ''))}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>taskloom API</title>"
            "<link rel='stylesheet' href='/static/app.css'></head><body class='docs'>"
            "<h1>taskloom dashboard API</h1><p>The machine-readable document is "
            "<a href='/api/openapi.json'>/api/openapi.json</a> (OpenAPI 3). Send "
            "<code>Authorization: Bearer KEY</code> (a key made by <code>taskloom keys add</code>); "
            "<em>admin</em> routes need an admin key.</p><table><thead><tr><th>method</th>"
            "<th>path</th><th>scope</th><th>what</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></body></html>")
