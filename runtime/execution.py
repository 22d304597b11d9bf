"""How a task body runs: on the event loop, in a thread, or in a process pool.

Time limits:

- ``async`` tasks are cancelled at their time limit (a cancel scope).
- ``thread`` tasks cannot be interrupted by Python: at the limit the worker
  stops waiting, fails the task with ``TaskTimeLimitExceeded`` and frees its
  slot, while the thread runs on to its end in the background (its outcome is
  discarded). Use ``kind="process"`` for work that must be killable.
- ``process`` tasks run in a pool of worker processes; at the limit the pool
  process is killed and replaced.

Soft limits (``soft_timeout``) raise ``SoftTimeLimitExceeded`` inside the body:
an ``async`` task at the await it is suspended in (:func:`soft_limited`), a
``process`` task wherever it is (a signal to its pool process's main thread,
interrupting a blocking call too), a ``thread`` task only at its next
``current_task().raise_if_cancelled()``.

What runs where: :data:`running` maps each worker runner (its task's id as
anyio gives it: on asyncio, ``id()`` of the asyncio task) to the message it is
handling, so that the loop-lag monitor, from its watchdog thread, can name
the task that blocks the loop from the loop's current task alone.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol

import anyio
import anyio.to_thread

from runtime.errors import SoftTimeLimitExceeded
from runtime.messages import TaskMessage
from runtime.registry import Task

__all__ = ["ProcessRunner", "TimeLimit", "execute", "running", "soft_limited"]

#: The message each runner is handling, by the id of the runner's task
#: (``anyio.get_current_task().id``); set and cleared by the worker, read by
#: the loop-lag monitor.
running: dict[int, TaskMessage] = {}


class TimeLimit(Exception):
    """The task body ran past its time limit."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"the task ran past its time limit of {limit:g}s")


class ProcessRunner(Protocol):
    async def run(self, fn: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], timeout: float | None) -> Any: ...


async def execute(
    task: Task[Any, Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float | None,
    *,
    threads: anyio.CapacityLimiter,
    processes: ProcessRunner | None,
) -> Any:
    """Run ``task`` with its arguments; raises TimeLimit past ``timeout``."""
    kind = task.kind
    if kind == "async":
        soft = task.soft_timeout
        if timeout is None:
            if soft is not None:
                return await soft_limited(task.fn(*args, **kwargs), soft)
            return await task.fn(*args, **kwargs)
        with anyio.move_on_after(timeout) as scope:
            if soft is not None:
                return await soft_limited(task.fn(*args, **kwargs), soft)
            return await task.fn(*args, **kwargs)
        if scope.cancelled_caught:
            raise TimeLimit(timeout)
        raise AssertionError("unreachable")  # pragma: no cover
    if kind == "thread":
        call = functools.partial(task.fn, *args, **kwargs)
        if timeout is None:
            return await anyio.to_thread.run_sync(call, limiter=threads)
        with anyio.move_on_after(timeout) as scope:
            return await anyio.to_thread.run_sync(call, limiter=threads, abandon_on_cancel=True)
        raise TimeLimit(timeout)
    if processes is None:
        raise RuntimeError(
            f"task {task.name!r} is kind='process' but this worker has no process pool; "
            "start the worker with processes enabled (see `taskloom worker --help`)"
        )
    return await processes.run(task.fn, args, kwargs, timeout)


class _SoftLimited:
    """Awaits ``coro``; ``soft_s`` seconds in, raises ``SoftTimeLimitExceeded``
    inside it at the await it is suspended in (once).

    How: a timer cancels the asyncio task with a marker message; the
    ``CancelledError`` reaches this wrapper (it sits between the task and the
    body), which takes the cancellation back (``uncancel``) and throws
    ``SoftTimeLimitExceeded`` into the body instead. Any other cancellation
    (a hard time limit, a shutdown, ``handle.cancel()``) passes through.
    """

    __slots__ = ("coro", "soft_s")

    def __init__(self, coro: Coroutine[Any, Any, Any], soft_s: float) -> None:
        self.coro = coro
        self.soft_s = soft_s

    def __await__(self) -> Generator[Any, Any, Any]:
        task = asyncio.current_task()
        assert task is not None
        fired = [False]
        marker = f"taskloom soft time limit {id(self)}"

        def fire() -> None:
            fired[0] = True
            task.cancel(msg=marker)

        timer = asyncio.get_running_loop().call_later(self.soft_s, fire)
        inner = self.coro.__await__()
        to_send: Any = None
        to_throw: BaseException | None = None
        try:
            while True:
                try:
                    yielded = (inner.throw(to_throw) if to_throw is not None
                               else inner.send(to_send))
                except StopIteration as stop:
                    return stop.value
                to_send, to_throw = None, None
                try:
                    to_send = yield yielded
                except asyncio.CancelledError as e:
                    if fired[0] and marker in e.args:
                        fired[0] = False
                        task.uncancel()
                        to_throw = SoftTimeLimitExceeded(self.soft_s)
                    else:
                        to_throw = e
                except BaseException as e:
                    to_throw = e
        finally:
            timer.cancel()


def soft_limited(coro: Coroutine[Any, Any, Any], soft_s: float) -> Any:
    """``coro`` with a soft time limit (asyncio: the event loop taskloom runs on)."""
    return _SoftLimited(coro, soft_s)
