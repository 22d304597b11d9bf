"""``TaskHandle``: a promise of one task's (or canvas's) outcome, by id."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from runtime.context import current
from runtime.deadletters import DeadLetterReason
from runtime.errors import (
    ResultExpired,
    ResultTimeout,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskTimeLimitExceeded,
    one_error,
)
from runtime.messages import ErrorInfo, Result, State

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["TaskHandle"]

R = TypeVar("R")

#: Stored failure reasons that mean the message was dead-lettered for what it
#: is (not because its task raised or ran out of time, which stay ``TaskError``
#: / ``TaskTimeLimitExceeded``): the caller gets ``TaskDeadLettered`` at once.
_DEAD_LETTERED = frozenset(
    r.value for r in DeadLetterReason
    if r not in (DeadLetterReason.FAILED, DeadLetterReason.TIME_LIMIT))


class TaskHandle(Generic[R]):
    """A promise of one task's (or canvas's) outcome, by id."""

    __slots__ = ("_return_type", "duplicate", "id", "runtime")

    def __init__(self, runtime: Runtime, task_id: str, return_type: Any = Any, *,
                 duplicate: bool = False) -> None:
        self.runtime = runtime
        self.id = task_id
        self._return_type = return_type
        #: True when ``enqueue(task_id=...)`` found that id already pending,
        #: running, finished (within the result TTL) or cancelled: nothing was
        #: sent, this handle follows the existing task
        self.duplicate = duplicate

    async def result(self, timeout: float | None = None) -> R:
        """The task's return value. Raises ``TaskError`` (or a subclass) if it
        failed, ``ResultTimeout`` if none arrives within ``timeout`` seconds
        (default: the runtime's ``result_timeout_s``), ``ResultExpired`` at
        once if the task finished but its result has expired."""
        rt = self.runtime
        ctx = current.get()  # inside a task: lend its slot while it waits
        with one_error, (ctx.lend() if ctx is not None and ctx.lend is not None
                         else nullcontext()):
            try:
                waited = await rt.results.wait(
                    self.id, rt.result_timeout_s if timeout is None else timeout)
            except ResultTimeout as e:
                if ctx is None:
                    raise
                raise ResultTimeout(e.task_id, e.timeout, e.state,
                                    waiter=f"{ctx.name} {ctx.id}") from None
        return self._outcome(waited)

    def _outcome(self, result: Result) -> R:
        if result.state is State.SUCCESS:
            if self._return_type is Any or result.value is None:
                return result.value  # type: ignore[no-any-return]
            try:
                return msgspec.convert(result.value, self._return_type)  # type: ignore[no-any-return]
            except msgspec.ValidationError:
                return result.value  # type: ignore[no-any-return]
        info = result.error or ErrorInfo(type="Unknown", message=f"state {result.state}")
        if result.state is State.REVOKED:
            raise TaskCancelled(info, self.id)
        if info.type == "TaskTimeLimitExceeded":
            raise TaskTimeLimitExceeded(info, self.id)
        if info.reason in _DEAD_LETTERED:
            raise TaskDeadLettered(info, self.id)
        raise TaskError(info, self.id)

    async def status(self) -> State:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED; ``ResultExpired``
        if the task finished but its result has expired (not PENDING)."""
        store = self.runtime.results
        with one_error:
            found = await store.get(self.id)
            if found is None and await store.expired(self.id):
                raise ResultExpired(self.id, store.ttl_s)
        return found.state if found is not None else State.PENDING

    async def info(self) -> Result | None:
        """The whole stored record (attempt, worker, timings), if any."""
        with one_error:
            return await self.runtime.results.get(self.id)

    async def updates(self) -> AsyncIterator[Result]:
        """The task's record each time it changes (STARTED, progress, RETRY),
        ending with its terminal result; pushed by the result store (pub/sub
        on Redis), never polled. Changes close together may coalesce into the
        latest. A task that never ends keeps this waiting: bound it with
        ``anyio.fail_after``."""
        with one_error:
            async for update in self.runtime.results.updates(self.id):
                yield update

    async def cancel(self) -> bool:
        """Cancel the task if it has not finished: it will never run (or, if it
        runs now, its outcome is discarded). Whether it was cancelled."""
        with one_error:
            return await self.runtime.results.revoke(self.id)

    def __await__(self) -> Generator[Any, None, R]:
        return self.result().__await__()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"
