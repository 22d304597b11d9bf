"""Event-loop lag: finding the async task that blocks the loop.

:class:`LagMonitor` runs in a worker process's task group. On the loop, it
sleeps ``interval_s`` over and over and measures how late it wakes; past
``threshold_s`` it logs a warning. To *name* the culprit, a watchdog thread
notices while the loop is still blocked and looks at the loop thread's stack
(``sys._current_frames``): the innermost frame says where it blocks. Which
taskloom task (name and id) is running comes from the loop's current asyncio
task, looked up in :data:`runtime.execution.running`, where each worker
runner records the message it is handling.

    monitor = LagMonitor(threshold_s=0.1)
    await tg.start(monitor.run)
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from types import FrameType

import anyio
import anyio.abc
import msgspec
import structlog

from runtime.errors import ConfigError
from runtime.execution import running

__all__ = ["LagMonitor", "Stall"]

log = structlog.get_logger("taskloom.lag")


class Stall(msgspec.Struct, frozen=True, kw_only=True):
    """One time the loop was blocked past the threshold."""

    lag_s: float
    #: the taskloom task running when the loop was seen blocked, if any
    task: str | None = None
    task_id: str | None = None
    #: the asyncio task (name, coroutine) holding the loop
    asyncio_task: str | None = None
    #: ``file:line in function`` of the innermost Python frame
    where: str | None = None


class _Seen(msgspec.Struct, frozen=True, kw_only=True):
    task: str | None = None
    task_id: str | None = None
    asyncio_task: str | None = None
    where: str | None = None


def _inspect(frame: FrameType | None, loop: asyncio.AbstractEventLoop | None) -> _Seen:
    """What the loop thread is doing, from another thread."""
    where = None
    task = task_id = None
    if frame is not None:
        code = frame.f_code
        where = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
    asyncio_task = None
    if loop is not None:
        try:
            current = asyncio.current_task(loop)
        except RuntimeError:
            current = None
        if current is not None:
            msg = running.get(id(current))  # anyio's task id on asyncio
            if msg is not None:
                task, task_id = msg.task, msg.id
            coro = current.get_coro()
            asyncio_task = f"{current.get_name()} ({getattr(coro, '__qualname__', coro)})"
    return _Seen(task=task, task_id=task_id, asyncio_task=asyncio_task, where=where)


class LagMonitor:
    """Measures event-loop lag and names the blocking task (see the module doc).

    ``stalls`` keeps the most recent stalls; ``max_lag_s`` the largest lag
    since the last :meth:`take_max` (heartbeats report it).
    """

    def __init__(self, threshold_s: float = 0.1, *, interval_s: float | None = None,
                 still_blocked_s: float | None = None, keep: int = 100) -> None:
        if threshold_s <= 0:
            raise ConfigError(f"the lag threshold must be positive seconds, got {threshold_s}; "
                              "give e.g. 0.1")
        self.threshold_s = threshold_s
        self.interval_s = interval_s if interval_s is not None else max(threshold_s / 4, 0.005)
        self.still_blocked_s = still_blocked_s if still_blocked_s is not None else max(
            1.0, threshold_s * 10)
        self.stalls: deque[Stall] = deque(maxlen=keep)
        self.max_lag_s = 0.0
        self._tick = time.monotonic()
        self._seen: tuple[float, _Seen] | None = None
        self._stop = threading.Event()

    def take_max(self) -> float:
        """The largest lag since the last call, and reset it."""
        value, self.max_lag_s = self.max_lag_s, 0.0
        return value

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Measure until cancelled."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): lag without names
            loop = None
        self._stop.clear()
        self._tick = time.monotonic()
        watchdog = threading.Thread(target=self._watch, args=(threading.get_ident(), loop),
                                    name="taskloom-lag-watchdog", daemon=True)
        watchdog.start()
        try:
            task_status.started()
            while True:
                before = self._tick = time.monotonic()
                await anyio.sleep(self.interval_s)
                lag = time.monotonic() - before - self.interval_s
                self.max_lag_s = max(self.max_lag_s, lag)
                if lag >= self.threshold_s:
                    self._report(before, lag)
        finally:
            self._stop.set()
            watchdog.join(timeout=1.0)

    def _report(self, tick: float, lag: float) -> None:
        seen = self._seen[1] if self._seen is not None and self._seen[0] == tick else _Seen()
        self._seen = None
        stall = Stall(lag_s=lag, task=seen.task, task_id=seen.task_id,
                      asyncio_task=seen.asyncio_task, where=seen.where)
        self.stalls.append(stall)
        fields = {"lag_ms": round(lag * 1000, 1), "threshold_ms": round(self.threshold_s * 1000)}
        if seen.task is not None:
            log.warning("an async task blocked the event loop; make it a plain def "
                        "(a thread), kind='process', or await instead of blocking",
                        task=seen.task, task_id=seen.task_id, where=seen.where, **fields)
        elif seen.asyncio_task is not None:
            log.warning("an asyncio task blocked the event loop", asyncio_task=seen.asyncio_task,
                        where=seen.where, **fields)
        else:
            log.warning("the event loop ran late with no task on it: threads holding the GIL "
                        "(CPU-bound thread tasks?) or too little CPU for this process", **fields)

    def _watch(self, thread_id: int, loop: asyncio.AbstractEventLoop | None) -> None:
        """The watchdog thread: look at the loop thread while it is blocked."""
        check = max(self.interval_s, self.threshold_s / 4)
        blocked_after = self.interval_s + self.threshold_s / 2
        warned_tick = None
        while not self._stop.wait(check):
            tick = self._tick
            elapsed = time.monotonic() - tick
            if elapsed < blocked_after:
                continue
            blocked = elapsed - self.interval_s
            if self._seen is None or self._seen[0] != tick:
                frame = sys._current_frames().get(thread_id)
                self._seen = (tick, _inspect(frame, loop))
                del frame
            if blocked >= self.still_blocked_s and warned_tick != tick:
                warned_tick = tick
                seen = self._seen[1]
                log.warning("the event loop is still blocked", blocked_ms=round(blocked * 1000),
                            task=seen.task, task_id=seen.task_id,
                            asyncio_task=seen.asyncio_task, where=seen.where)
