"""Lifecycle hooks: code the user runs on the worker once a task's outcome is stored.

Per task (``@rt.task(on_success=..., on_failure=..., on_retry=..., on_cancel=...)``)
and runtime-wide (``@rt.on_success`` ...; every task's). Each is called once
per outcome, after the outcome is stored and before the delivery is settled,
in the worker's event loop: an ``async`` hook is awaited, a plain function is
called (keep it short: it holds the loop). Signatures::

    on_success(ctx, value)       on_failure(ctx, error)
    on_retry(ctx, error, delay_s)  on_cancel(ctx)

``ctx`` is the task's :class:`runtime.context.CurrentTask`; ``error`` the
exception the task raised (a ``TaskError`` when the task did not raise, e.g.
bad arguments). A hook that raises is logged with the task id and never
changes the outcome. A cancelled task calls ``on_cancel``, never ``on_failure``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import structlog

from runtime.errors import TaskError
from runtime.flow import Kind, Outcome
from runtime.messages import ErrorInfo
from runtime.persist import type_name
from runtime.registry import Task

__all__ = ["Event", "Hooks", "after_outcome", "call_hooks"]

log = structlog.get_logger("taskloom.worker")

Event = Literal["on_success", "on_failure", "on_retry", "on_cancel"]
F = TypeVar("F", bound=Callable[..., Any])


class Hooks:
    """The runtime-wide hooks (mixed into ``Runtime``)."""

    def __init__(self) -> None:
        self.hooks: dict[Event, list[Callable[..., Any]]] = {
            "on_success": [], "on_failure": [], "on_retry": [], "on_cancel": []}

    def on_success(self, fn: F) -> F:
        """Register ``fn(ctx, value)`` for every task's success."""
        self.hooks["on_success"].append(fn)
        return fn

    def on_failure(self, fn: F) -> F:
        """Register ``fn(ctx, error)`` for every task's failure for good."""
        self.hooks["on_failure"].append(fn)
        return fn

    def on_retry(self, fn: F) -> F:
        """Register ``fn(ctx, error, delay_s)`` for every retry."""
        self.hooks["on_retry"].append(fn)
        return fn

    def on_cancel(self, fn: F) -> F:
        """Register ``fn(ctx)`` for every task cancelled while it ran."""
        self.hooks["on_cancel"].append(fn)
        return fn


async def call_hooks(hooks: list[Callable[..., Any]], event: Event, task_id: str,
                     *args: Any) -> None:
    """Call each hook with ``args``; one that raises is logged, never raised."""
    for hook in hooks:
        try:
            out = hook(*args)
            if inspect.isawaitable(out):
                await out
        except Exception as e:
            log.error("a task hook raised; the task's outcome stands", hook=event,
                      task_id=task_id, function=getattr(hook, "__qualname__", repr(hook)),
                      error_type=type_name(e), exc_info=e)


_EVENTS: dict[Kind, Event] = {Kind.SUCCESS: "on_success", Kind.FAILURE: "on_failure",
                              Kind.RETRY: "on_retry", Kind.REVOKED: "on_cancel"}


async def after_outcome(shared: dict[Event, list[Callable[..., Any]]], task: Task[Any, Any],
                        outcome: Outcome) -> None:
    """Call the hooks of ``outcome`` (stored already): the task's, then the runtime's."""
    ctx = outcome.ctx
    event = _EVENTS.get(outcome.kind)
    if ctx is None or event is None:
        return
    own = getattr(task, event)
    hooks = ([own] if own is not None else []) + shared[event]
    if not hooks:
        return
    if event == "on_success":
        args: tuple[Any, ...] = (ctx, outcome.value)
    elif event == "on_cancel":
        args = (ctx,)
    else:
        error = outcome.exc if isinstance(outcome.exc, Exception) else TaskError(
            outcome.info or ErrorInfo(type="Unknown", message="no error recorded"), ctx.id)
        args = (ctx, error, outcome.delay_s) if event == "on_retry" else (ctx, error)
    await call_hooks(hooks, event, ctx.id, *args)
