"""Judging what a task body did: success, replacement, retry or failure, once.

Pure (no I/O): the worker calls :func:`judge` with what the body returned or
raised; the outcome then goes down the one settle path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from brokers.base import Delivery
from runtime import canvas
from runtime.deadletters import DeadLetterReason as Why
from runtime.errors import Reject, Retry
from runtime.execution import TimeLimit, running
from runtime.flow import Kind, Outcome, error_info
from runtime.messages import MAX_COUNT, ErrorInfo, TaskMessage
from runtime.registry import Task
from runtime.retry import next_delay

__all__ = ["cancelled", "count_of", "judge", "message_id", "named", "reason", "retry_or_fail"]

log = structlog.get_logger("taskloom.worker")

#: Longest message id (set by whoever published) written to a log line.
_MAX_ID_IN_LOG = 200
#: What a task returns to be replaced by a canvas.
_CANVASES = (canvas.Signature, canvas.Chain, canvas.Group, canvas.Chord)


def judge(msg: TaskMessage, task: Task[Any, Any], value: Any,
          error: BaseException | None, started: int) -> Outcome:
    """The outcome of a body that returned ``value`` or raised ``error``."""
    if error is None:
        kind = Kind.REPLACE if isinstance(value, _CANVASES) else Kind.SUCCESS
        return Outcome(kind=kind, value=value, started=started, ran=True)
    if isinstance(error, Reject):
        return Outcome.failure(error_info(error, Why.REJECTED), started=started, ran=True)
    if isinstance(error, Retry):
        return retry_or_fail(msg, task, error, error.delay_s, started)
    if isinstance(error, TimeLimit):
        return retry_or_fail(msg, task, error, None, started,
                             type_name="TaskTimeLimitExceeded")
    if isinstance(error, Exception) and isinstance(error, task.retry_on):
        return retry_or_fail(msg, task, error, None, started)
    return Outcome.failure(error_info(error, Why.FAILED), started=started, ran=True)


def retry_or_fail(msg: TaskMessage, task: Task[Any, Any], exc: BaseException,
                  delay_s: float | None, started: int, *,
                  type_name: str | None = None) -> Outcome:
    """A retry after ``delay_s`` (or the task's policy), or a failure when
    the task is out of retries."""
    retries = msg.retries if msg.retries is not None else task.retry.retries
    info = error_info(exc, Why.FAILED)
    if type_name is not None:
        info = ErrorInfo(type=type_name, message=info.message, traceback=info.traceback,
                         reason=Why.TIME_LIMIT.value)
    if msg.attempt > retries:
        return Outcome.failure(info, started=started, ran=True)
    delay = delay_s if delay_s is not None else next_delay(msg.attempt, task.retry)
    log.info("retrying a task", task_id=msg.id, task=msg.task, attempt=msg.attempt,
             retries=retries, delay_s=round(delay, 3), error=f"{info.type}: {info.message[:300]}")
    return Outcome(kind=Kind.RETRY, info=info, delay_s=delay, started=started, ran=True)


def count_of(delivery: Delivery) -> int:
    """The broker's delivery count, whatever the broker handed over, as an int
    in 0..MAX_COUNT (it is not signed: recorded in results, never decided on)."""
    try:
        count = delivery.delivery_count
    except Exception:
        return 0
    if not isinstance(count, int) or isinstance(count, bool):
        return 0
    return min(max(count, 0), MAX_COUNT)


def message_id(delivery: Delivery) -> str:
    """The envelope id for a log line (not signed: any string, cut short)."""
    try:
        value = delivery.envelope.id
    except Exception:
        return "?"
    return value[:_MAX_ID_IN_LOG] if isinstance(value, str) else "?"


def reason(value: str, default: Why) -> Why:
    try:
        return Why(value)
    except ValueError:
        return default


def cancelled(msg: TaskMessage, started: int) -> Outcome:
    return Outcome(kind=Kind.REVOKED, started=started, ran=True, info=ErrorInfo(
        type="TaskCancelled", reason="cancelled",
        message="cancelled by TaskHandle.cancel() while it ran"))


def named(msg: TaskMessage, call: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """``call`` that records ``msg`` as running in the task that calls it (the
    claim-keeping child task) for the loop-lag monitor."""

    async def named() -> Any:
        key = anyio.get_current_task().id
        running[key] = msg
        try:
            return await call()
        finally:
            running.pop(key, None)

    return named
