"""Every error taskloom raises, under one root a user can catch::

    TaskloomError
    ├── ConfigError                 bad settings, bad task options
    ├── BrokerError                 (brokers.base) connection, publish, settlement
    ├── EnqueueError                raised at enqueue time, before anything is sent
    │   ├── UnknownTaskError
    │   ├── ArgumentsError          arguments do not fit the task's signature
    │   ├── EncodeError             a value cannot be encoded
    │   └── PayloadTooLarge
    ├── DecodeError                 bad bytes, bad signature, unknown version
    ├── ResultError
    │   ├── ResultTimeout           no result within the timeout
    │   ├── ResultExpired
    │   └── ResultStoreUnavailable  the result store cannot be reached
    ├── NotInTaskError              current_task() called outside a task body
    └── TaskError                   the task failed; ``.info`` says how
        ├── TaskTimeLimitExceeded
        ├── TaskCancelled
        └── TaskDeadLettered

Raised inside task bodies (control flow, not errors): ``Retry`` and ``Reject``;
``SoftTimeLimitExceeded`` is raised *into* a task body at its ``soft_timeout``.

Public entry points raise these types, never an ``ExceptionGroup`` of one:
``with one_error:`` (below) around the library's own task groups unwraps it.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from brokers.base import (
    BrokerConnectionError,
    BrokerError,
    ConfigError,
    ConnectionFailed,
    ConnectionLost,
    DeliveryAlreadySettled,
    PublishError,
    QueueNotFound,
    TaskloomError,
)

if TYPE_CHECKING:
    from runtime.messages import ErrorInfo

__all__ = [
    "ArgumentsError",
    "BrokerConnectionError",
    "BrokerError",
    "ConfigError",
    "ConnectionFailed",
    "ConnectionLost",
    "DecodeError",
    "DeliveryAlreadySettled",
    "EncodeError",
    "EnqueueError",
    "PayloadTooLarge",
    "PublishError",
    "QueueNotFound",
    "Reject",
    "ResultError",
    "ResultExpired",
    "ResultStoreUnavailable",
    "ResultTimeout",
    "Retry",
    "TaskCancelled",
    "TaskDeadLettered",
    "TaskError",
    "TaskTimeLimitExceeded",
    "TaskloomError",
    "UnknownTaskError",
]


class EnqueueError(TaskloomError):
    """A task could not be enqueued; nothing was sent."""


class UnknownTaskError(EnqueueError, LookupError):
    """No task of that name is registered."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        hint = ""
        if known:
            shown = ", ".join(sorted(known)[:10])
            hint = f" (registered: {shown}{', …' if len(known) > 10 else ''})"
        super().__init__(
            f"no task named {name!r} is registered{hint}; "
            "decorate it with @runtime.task or check the name"
        )


class ArgumentsError(EnqueueError, TypeError):
    """The arguments do not fit the task's signature or type hints."""

    def __init__(self, task: str, detail: str) -> None:
        self.task = task
        self.detail = detail
        super().__init__(f"bad arguments for task {task!r}: {detail}")


class EncodeError(EnqueueError, TypeError):
    """A value cannot be encoded into a message."""


class PayloadTooLarge(EnqueueError, ValueError):
    """The encoded message is over the size limit."""

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the encoded {what} is {size} bytes, over the limit of {limit} bytes; "
            "pass large data by reference (a URL or key) or raise max_message_bytes"
        )


class DecodeError(TaskloomError, ValueError):
    """A message could not be decoded: it is dead-lettered, never executed."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class ResultError(TaskloomError):
    """A result could not be had."""


class ResultTimeout(ResultError, TimeoutError):
    """No terminal result arrived within the timeout."""

    def __init__(self, task_id: str, timeout: float, state: str = "PENDING", *,
                 task: str = "", waiter: str = "") -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.state = state
        #: the name of the task waited on, and of the task that waited (nested), if known
        self.task = task
        self.waiter = waiter
        named = f" ({task})" if task else ""
        inside = f", awaited inside task {waiter}" if waiter else ""
        super().__init__(
            f"task {task_id}{named} has no result after {timeout:g}s (state {state}{inside}); "
            "is a worker consuming its queue? wait longer or check `taskloom status`"
        )


class ResultExpired(ResultError, LookupError):
    """The task finished, but its result's time to live has passed: it will
    never arrive (raised at once instead of waiting for ``ResultTimeout``)."""

    def __init__(self, task_id: str, ttl_s: float | None = None) -> None:
        self.task_id = task_id
        self.ttl_s = ttl_s
        kept = f" (results are kept {ttl_s:g}s after the task ends)" if ttl_s else ""
        super().__init__(
            f"task {task_id} finished but its result has expired{kept}; read results "
            "sooner, or keep them longer with @rt.task(result_ttl=...) or "
            "Runtime(result_ttl_s=...)")


class ResultStoreUnavailable(ResultError):
    """The result store cannot be reached."""


class TaskError(TaskloomError):
    """The task failed. ``info`` carries the remote error's type name, message,
    traceback and attempt; the remote exception type is never imported."""

    def __init__(self, info: ErrorInfo, task_id: str = "") -> None:
        self.info = info
        self.task_id = task_id
        super().__init__(f"task {task_id} failed: {info.type}: {info.message}")

    def is_(self, exc_type: type[BaseException]) -> bool:
        """Whether the remote error was of ``exc_type`` (compared by name)."""
        return self.info.type in (exc_type.__qualname__, f"{exc_type.__module__}.{exc_type.__qualname__}")


class TaskTimeLimitExceeded(TaskError):
    """The task ran past its time limit."""


class TaskCancelled(TaskError):
    """The task was cancelled before it finished."""


class TaskDeadLettered(TaskError):
    """The task's message was dead-lettered without the task failing on its
    own (``unknown_task``, ``bad_arguments``, ``rejected``, ``bad_result``,
    ``decode_error``, ...): ``reason`` names why, as in ``taskloom dlq``."""

    def __init__(self, info: ErrorInfo, task_id: str = "") -> None:
        super().__init__(info, task_id)
        #: the dead-letter reason (a ``runtime.deadletters.DeadLetterReason`` value)
        self.reason = info.reason
        self.args = (f"{self.args[0]} (dead-lettered as {info.reason}: see the README's "
                     "'Dead letters' table for what to do, and `taskloom dlq` to replay it)",)


class NotInTaskError(TaskloomError, LookupError):
    """``current_task()`` was called where no task runs."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task body when it runs past its ``soft_timeout``: catch
    it to clean up (or return early) before the hard ``timeout`` stops it."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"the task ran past its soft time limit of {limit:g}s; finish up or "
                         "it is stopped at its hard timeout")


class Retry(Exception):
    """Raise inside a task to retry it, after ``delay_s`` (or the task's backoff)."""

    def __init__(self, delay_s: float | None = None, reason: str = "") -> None:
        self.delay_s = delay_s
        self.reason = reason
        super().__init__(reason or "retry requested")


class Reject(Exception):
    """Raise inside a task to dead-letter it at once, without retries."""

    def __init__(self, reason: str = "rejected") -> None:
        self.reason = reason
        super().__init__(reason)


class _OneError:
    """At a public boundary, turn an ``ExceptionGroup`` holding exactly one
    exception (however deeply nested) back into that exception, with its own
    traceback and cause. Used only around the library's own task groups, never
    around a user's code; a group of two or more is left as it is."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, BaseExceptionGroup):
            leaf = sole_exception(exc)
            if leaf is not None:
                context = leaf.__context__
                try:
                    raise leaf
                finally:
                    leaf.__context__ = context  # not "during handling of the group"


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside ``group`` (through nested groups of one), else None."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        if len(found.exceptions) != 1:
            return None
        found = found.exceptions[0]
    return found


#: ``with one_error: ...`` around library code at every public entry point.
one_error = _OneError()
