"""The running task's own context: ``current_task()``.

    @rt.task
    async def embed(doc_id: str) -> int:
        ctx = current_task()
        ctx.meta["model"] = "minilm"      # stored with the result
        ...

The worker sets it around the task body (a ``contextvars.ContextVar``): an
``async`` task reads it directly, a thread task through the context copied
into its thread, a process task from what the pool sends its child with the
call (its ``meta`` comes back with the reply). Building it costs one small
object per task; its fields are read from the message on access.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio.lowlevel

from runtime.errors import NotInTaskError, SoftTimeLimitExceeded, TaskCancelled
from runtime.messages import ErrorInfo, Progress, Result, State, TaskMessage

if TYPE_CHECKING:
    from runtime.states import StateWriter

__all__ = ["CurrentTask", "current_task"]


class CurrentTask:
    """What a running task knows of itself. ``meta`` is stored with its result."""

    __slots__ = (
        "_cancelled",
        "_flush_pending",
        "_home",
        "_sink",
        "_soft",
        "_states",
        "delivery_count",
        "last_progress",
        "lend",
        "message",
        "meta",
        "started_ms",
        "worker",
    )

    def __init__(self, message: TaskMessage, *, delivery_count: int = 0, worker: str = "",
                 meta: dict[str, Any] | None = None, states: StateWriter | None = None,
                 started_ms: int | None = None,
                 home: tuple[asyncio.AbstractEventLoop, int] | None = None,
                 soft: tuple[float, float] | None = None,
                 lend: Callable[[], AbstractContextManager[None]] | None = None,
                 sink: Callable[[Progress], None] | None = None) -> None:
        self.message = message
        self.delivery_count = delivery_count
        self.worker = worker
        #: stored with the task's result (and with a retry's record)
        self.meta: dict[str, Any] = {} if meta is None else meta
        #: the latest progress reported (stored with the outcome too)
        self.last_progress: Progress | None = None
        self.started_ms = started_ms
        self._states = states
        #: the worker's event loop and its thread (progress from a thread hops there)
        self._home = home
        self._flush_pending = False
        self._cancelled = False
        #: a thread task's soft time limit: (its seconds, its monotonic deadline)
        self._soft = soft
        #: the worker's way to lend this task's slot while it awaits a nested run
        self.lend = lend
        #: where a pool process sends each report (to the pool, which calls :meth:`report`)
        self._sink = sink

    # -- progress ------------------------------------------------------------------

    async def progress(self, done: float, total: float | None = None,
                       message: str | None = None, **meta: Any) -> None:
        """Record how far the task is: the latest report is stored (written
        off the hot path, coalesced: a tight loop costs a few writes, not one
        per call) and streamed to ``handle.updates()``. A point where a
        cancelled task stops."""
        self._note(done, total, message, meta)
        await anyio.lowlevel.checkpoint_if_cancelled()

    def progress_sync(self, done: float, total: float | None = None,
                      message: str | None = None, **meta: Any) -> None:
        """:meth:`progress` for a thread or process task (from a process, the
        latest report reaches the worker while the task runs, coalesced the same way)."""
        self._note(done, total, message, meta)
        if self._cancelled:
            self.raise_if_cancelled()

    def _note(self, done: float, total: float | None, message: str | None,
              meta: dict[str, Any]) -> None:
        self.report(Progress(done=done, total=total, message=message, meta=meta,
                             at_ms=int(time.time() * 1000)))

    def report(self, progress: Progress) -> None:
        """Record ``progress`` as the latest report (the process pool does, for
        the reports a process task sends while it runs)."""
        self.last_progress = progress
        sink = self._sink
        if sink is not None:
            sink(progress)
            return
        states = self._states
        if states is None:
            return
        home = self._home
        if home is None or home[1] == threading.get_ident():
            self._flush()
        elif not self._flush_pending:  # from a thread: one hop to the loop per batch
            self._flush_pending = True
            home[0].call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        states, p = self._states, self.last_progress
        if states is None or p is None:
            return
        m = self.message
        states.note(Result(id=m.id, task=m.task, state=State.STARTED, attempt=m.attempt,
                           delivery_count=self.delivery_count, worker=self.worker,
                           started_ms=self.started_ms, progress=p, meta=self.meta))

    # -- cancellation ----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """Whether ``handle.cancel()`` reached this task (a thread task checks it)."""
        return self._cancelled

    def cancel(self) -> None:
        """Mark the task cancelled (the worker does, on ``handle.cancel()``)."""
        self._cancelled = True

    def raise_if_cancelled(self) -> None:
        """Raise ``TaskCancelled`` if the task was cancelled, and (once)
        ``SoftTimeLimitExceeded`` past a thread task's ``soft_timeout``: thread
        tasks call it between steps, as Python cannot interrupt a thread."""
        soft = self._soft
        if soft is not None and time.monotonic() >= soft[1]:
            self._soft = None
            raise SoftTimeLimitExceeded(soft[0])
        if self._cancelled:
            raise TaskCancelled(ErrorInfo(type="TaskCancelled", reason="cancelled",
                                          message="cancelled by TaskHandle.cancel() while "
                                                  "it ran"), self.message.id)

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def name(self) -> str:
        return self.message.task

    @property
    def attempt(self) -> int:
        return self.message.attempt

    @property
    def queue(self) -> str:
        return self.message.queue

    @property
    def priority(self) -> int:
        return self.message.priority

    @property
    def parent_id(self) -> str | None:
        return self.message.parent_id

    @property
    def root_id(self) -> str | None:
        return self.message.root_id

    @property
    def group_id(self) -> str | None:
        """The group or chord this task is a member of, if any."""
        chord = self.message.chord
        return chord.id if chord is not None else None

    @property
    def headers(self) -> dict[str, str]:
        """The headers set on the message (a copy)."""
        return dict(self.message.headers)

    def __repr__(self) -> str:
        return f"<CurrentTask {self.name} id={self.id} attempt={self.attempt}>"


current: ContextVar[CurrentTask | None] = ContextVar("taskloom_current_task", default=None)


def current_task() -> CurrentTask:
    """The context of the task running here; ``NotInTaskError`` outside a task body."""
    ctx = current.get()
    if ctx is None:
        raise NotInTaskError(
            "current_task() was called outside a task body; call it from inside a function "
            "registered with @runtime.task while a worker runs it (in a test, run the task "
            "through a worker: `async with rt, rt.worker(): await run(task.s())`)")
    return ctx
