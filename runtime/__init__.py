"""taskloom: an asyncio-native, broker-agnostic task runtime.

    from runtime import Runtime, run

    rt = Runtime()

    @rt.task(retries=3, timeout=10)
    async def add(x: int, y: int) -> int:
        return x + y

    async with rt, rt.worker():
        assert await run(add.s(1, 2)) == 3

Every name the README shows is importable from here. Importing ``runtime``
loads neither the Redis nor the AMQP client nor OpenTelemetry, and configures
no logging: ``TracingMiddleware`` (OpenTelemetry), ``ProcessPool`` (process
management) and the schedule rules ``cron``, ``every``, ``at`` load on first use.
"""

import typing

from runtime.app import Runtime, TaskHandle, run
from runtime.canvas import Signature, chain, chord, chunks, group, map, starmap
from runtime.context import CurrentTask, current_task
from runtime.deadletters import DeadLetterReason
from runtime.encryption import SealedResultError
from runtime.errors import (
    ArgumentsError,
    ConfigError,
    DecodeError,
    EncodeError,
    EnqueueError,
    NotInTaskError,
    PayloadTooLarge,
    Reject,
    ResultError,
    ResultExpired,
    ResultStoreUnavailable,
    ResultTimeout,
    Retry,
    SoftTimeLimitExceeded,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskloomError,
    TaskTimeLimitExceeded,
    UnknownTaskError,
)
from runtime.logs import configure_logging
from runtime.messages import Progress, Result, State, TaskOptions
from runtime.middleware import CallNext, Middleware, TaskContext
from runtime.registry import Task
from runtime.results import MemoryResultStore, ResultStore, results_from_url
from runtime.retry import RetryPolicy
from runtime.testing import running
from runtime.worker import Worker

if typing.TYPE_CHECKING:
    from runtime.ops.scheduler import at, cron, every
    from runtime.process.pool import ProcessPool
    from runtime.tracing import TracingMiddleware

__all__ = [
    "ArgumentsError",
    "CallNext",
    "ConfigError",
    "CurrentTask",
    "DeadLetterReason",
    "DecodeError",
    "EncodeError",
    "EnqueueError",
    "MemoryResultStore",
    "Middleware",
    "NotInTaskError",
    "PayloadTooLarge",
    "ProcessPool",
    "Progress",
    "Reject",
    "Result",
    "ResultError",
    "ResultExpired",
    "ResultStore",
    "ResultStoreUnavailable",
    "ResultTimeout",
    "Retry",
    "RetryPolicy",
    "Runtime",
    "SealedResultError",
    "Signature",
    "SoftTimeLimitExceeded",
    "State",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskDeadLettered",
    "TaskError",
    "TaskHandle",
    "TaskOptions",
    "TaskTimeLimitExceeded",
    "TaskloomError",
    "TracingMiddleware",
    "UnknownTaskError",
    "Worker",
    "at",
    "chain",
    "chord",
    "chunks",
    "configure_logging",
    "cron",
    "current_task",
    "every",
    "group",
    "map",
    "results_from_url",
    "run",
    "running",
    "starmap",
]


def __getattr__(name: str) -> typing.Any:
    """The names whose modules load on first use (OpenTelemetry, process management)."""
    if name == "TracingMiddleware":
        from runtime.tracing import TracingMiddleware

        globals()[name] = TracingMiddleware
        return TracingMiddleware
    if name == "ProcessPool":
        from runtime.process.pool import ProcessPool

        globals()[name] = ProcessPool
        return ProcessPool
    if name in ("at", "cron", "every"):  # the scheduler's rules load its Redis store
        from runtime.ops import scheduler

        rule = getattr(scheduler, name)
        globals()[name] = rule
        return rule
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
