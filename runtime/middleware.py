"""Middleware: the optional and cross-cutting (tracing, metrics, context).

Core promises (late ack, retries, time limits, dead letters, canvas follow-up)
are the worker's and never depend on middleware order.

- ``before_publish(message)`` runs on the client side for every message and
  returns the message to send (a new frozen struct, e.g. with trace headers).
  An exception fails the publish.
- ``execute(ctx, call_next)`` wraps a task body on the worker; it must
  ``await call_next(ctx)`` in the same task (spawning would lose contextvars).
  An exception takes the task's normal failure path.

The execution chain is built once per worker, and a middleware that does not
override ``execute`` is left out of it, so it costs nothing per task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from runtime.messages import TaskMessage
from runtime.registry import Task

__all__ = ["CallNext", "Middleware", "TaskContext", "build_chain"]


class TaskContext(msgspec.Struct, kw_only=True):
    """What a middleware knows of the execution it wraps."""

    message: TaskMessage
    task: Task[Any, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    delivery_count: int
    worker: str
    timeout: float | None = None


CallNext = Callable[[TaskContext], Awaitable[Any]]


class Middleware:
    """Override any subset; the defaults pass through."""

    def before_publish(self, message: TaskMessage) -> TaskMessage:
        return message

    async def execute(self, ctx: TaskContext, call_next: CallNext) -> Any:
        return await call_next(ctx)


def build_chain(middleware: Sequence[Middleware], inner: CallNext) -> CallNext:
    """``inner`` wrapped by every middleware that overrides ``execute``, the
    first in the list outermost."""
    call = inner
    for m in reversed(middleware):
        if type(m).execute is Middleware.execute:
            continue

        def wrap(ctx: TaskContext, _m: Middleware = m, _next: CallNext = call) -> Awaitable[Any]:
            return _m.execute(ctx, _next)

        call = wrap
    return call
