"""How a task body runs: on the event loop, in a thread, or in a process pool.

Time limits:

- ``async`` tasks are cancelled at their time limit (a cancel scope).
- ``thread`` tasks cannot be interrupted by Python: at the limit the worker
  stops waiting, fails the task with ``TaskTimeLimitExceeded`` and frees its
  slot, while the thread runs on to its end in the background (its outcome is
  discarded). Use ``kind="process"`` for work that must be killable.
- ``process`` tasks run in a pool of worker processes; at the limit the pool
  process is killed and replaced.

What runs where: :data:`running` maps each worker runner (its task's id as
anyio gives it: on asyncio, ``id()`` of the asyncio task) to the message it is
handling, so that the loop-lag monitor, from its watchdog thread, can name
the task that blocks the loop from the loop's current task alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.to_thread

from runtime.messages import TaskMessage
from runtime.registry import Task

__all__ = ["ProcessRunner", "TimeLimit", "execute", "running"]

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
        if timeout is None:
            return await task.fn(*args, **kwargs)
        with anyio.move_on_after(timeout) as scope:
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
