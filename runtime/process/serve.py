"""Running one worker process until it is told to stop.

``serve_worker`` runs, in one task group on this process's event loop: the
:class:`~runtime.worker.Worker`, a :class:`~runtime.process.lag.LagMonitor`, the
liveness heartbeats, the signal handler and, under a supervisor, the link to
it (readiness, recycling, parent death) and the recycling checks. Tasks of
``kind="process"`` get a :class:`~runtime.process.pool.ProcessPool`.

Signals: SIGTERM or SIGINT drains (stop taking work; in-flight tasks get the
grace period); a second one stops at once (unfinished tasks are handed back
to the broker).
"""

from __future__ import annotations

import functools
import os
import re
import signal
from contextlib import AsyncExitStack
from typing import Any

import anyio
import msgspec
import structlog

from runtime.app import Runtime
from runtime.errors import BrokerConnectionError, ResultStoreUnavailable
from runtime.execution import ProcessRunner
from runtime.ops.api import pauses_for
from runtime.ops.scheduler import run_scheduler
from runtime.process.lag import LagMonitor
from runtime.process.liveness import publish_heartbeats, store_for
from runtime.process.loading import die_with_parent
from runtime.worker import Worker

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CRASH_LOOP",
    "EXIT_FORCED",
    "EXIT_OK",
    "EXIT_RECYCLED",
    "EXIT_UNREACHABLE",
    "ParentLink",
    "WorkerOptions",
    "parse_size",
    "serve_worker",
]

log = structlog.get_logger("taskloom.serve")

#: stopped cleanly (drained)
EXIT_OK = 0
#: startup or configuration error (bad APP, bad option, app cannot be loaded)
EXIT_CONFIG = 1
#: supervisor: children kept dying before they became ready
EXIT_CRASH_LOOP = 3
#: a supervised child drained itself to be replaced (max tasks or memory)
EXIT_RECYCLED = 4
#: the broker or the result store could not be reached (at startup: a running
#: worker rides out outages of any length); retrying later may succeed, so a
#: supervisor restarts such a child with capped backoff and never counts it as
#: a crash loop
EXIT_UNREACHABLE = 5
#: a second signal stopped it at once (or children had to be killed)
EXIT_FORCED = 130

SUPERVISOR_PID_ENV = "TASKLOOM_SUPERVISOR_PID"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``512MiB``, ``1.5GiB``, ``500MB``, ``800M`` (= MiB) or plain bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 512MiB, 2GiB, 500MB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    if not unit:
        return int(number)
    power = "kmgt".index(unit) + 1
    base = 1000 if (not binary and text.strip().lower().endswith("b")) else 1024
    return int(number * base**power)


class WorkerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """How to run one worker process."""

    #: module:attribute of the Runtime (process pools import it by this name)
    app: str
    queues: tuple[str, ...] | None = None
    concurrency: int = 100
    prefetch: int | None = None
    shutdown_grace_s: float = 30.0
    #: processes for kind="process" tasks: None = CPU count when the app has
    #: process tasks, 0 = no pool
    pool_size: int | None = None
    #: take at most this many tasks, then drain and exit with EXIT_RECYCLED (supervised)
    max_tasks: int | None = None
    #: drain and exit with EXIT_RECYCLED past this RSS in bytes (supervised)
    max_memory_bytes: int | None = None
    #: warn when the loop is blocked longer (0: no lag monitor)
    lag_threshold_s: float = 0.1
    #: seconds between heartbeats (0: none)
    heartbeat_s: float = 5.0
    #: seconds between checks of the memory limit
    recycle_check_s: float = 0.5
    #: also run a scheduler (any number of workers may; one leads)
    scheduler: bool = False


class ParentLink:
    """A supervised child's side of the link to its supervisor.

    - status: JSON lines on a pipe (the child's original stdout; the child's
      fd 1 is pointed at stderr so prints cannot corrupt it): ``ready``,
      ``recycling``, ``fatal``;
    - parent death: ``PR_SET_PDEATHSIG`` (SIGTERM: drain) and EOF on stdin.
    """

    def __init__(self, status_fd: int, parent_pid: int | None) -> None:
        self.status_fd = status_fd
        self.parent_pid = parent_pid

    @classmethod
    def attach(cls) -> ParentLink:
        parent = os.environ.get(SUPERVISOR_PID_ENV)
        parent_pid = int(parent) if parent else None
        die_with_parent(signal.SIGTERM, parent_pid)
        status_fd = os.dup(1)  # not inherited by this child's own children
        os.dup2(2, 1)
        return cls(status_fd, parent_pid)

    def send(self, event: str, **fields: Any) -> None:
        line = msgspec.json.encode({"event": event, "pid": os.getpid(), **fields}) + b"\n"
        try:
            os.write(self.status_fd, line)
        except OSError as e:  # the supervisor is gone: parent death handling takes over
            log.debug("could not tell the supervisor", event=event, error=str(e))

    async def wait_parent_gone(self, fd: int = 0) -> None:
        """Return at EOF on ``fd`` (stdin): the supervisor closed it or died."""
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return


def _has_process_tasks(rt: Runtime) -> bool:
    return any(task.kind == "process" for task in rt.registry)


def _unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or every error of a group) says a server is unreachable."""
    if isinstance(error, BaseExceptionGroup):
        return all(_unreachable(e) for e in error.exceptions)
    return isinstance(error, (BrokerConnectionError, ResultStoreUnavailable))


async def _recycle_reason(opts: WorkerOptions, stopping: anyio.Event) -> str | None:
    """Why this process should be replaced (memory reached), checked every
    ``opts.recycle_check_s``; None once it is stopping anyway. (The task
    budget is the worker's own: ``Worker(max_tasks=)``, exact, not polled.)"""
    import psutil

    me = psutil.Process()
    while not stopping.is_set():
        with anyio.move_on_after(opts.recycle_check_s):
            await stopping.wait()
        if opts.max_memory_bytes is not None:
            rss = me.memory_info().rss
            if rss >= opts.max_memory_bytes:
                return f"RSS {rss} bytes (max {opts.max_memory_bytes})"
    return None


async def serve_worker(rt: Runtime, opts: WorkerOptions, *, link: ParentLink | None = None,
                       processes: ProcessRunner | None = None) -> int:
    """Serve until signalled (or recycled); returns the process exit code.
    ``processes`` overrides the process pool built for ``kind="process"`` tasks.
    When the broker or the result store cannot be reached, it logs why and
    returns :data:`EXIT_UNREACHABLE`."""
    try:
        return await _serve_worker(rt, opts, link=link, processes=processes)
    except BaseException as e:
        if not isinstance(e, Exception) or not _unreachable(e):
            raise
        leaf: BaseException = e
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        log.error("the worker cannot reach its broker or result store; exiting with code "
                  f"{EXIT_UNREACHABLE} (a supervisor restarts it with backoff): check that "
                  "the server runs and is reachable", error=str(leaf),
                  error_type=type(leaf).__name__)
        return EXIT_UNREACHABLE


async def _serve_worker(rt: Runtime, opts: WorkerOptions, *, link: ParentLink | None,
                        processes: ProcessRunner | None) -> int:
    from runtime.process.pool import ProcessPool

    code = EXIT_OK
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(rt)
        if processes is None and opts.pool_size != 0 and _has_process_tasks(rt):
            processes = await stack.enter_async_context(ProcessPool(opts.app, opts.pool_size))
        worker = Worker(rt, queues=opts.queues, concurrency=opts.concurrency,
                        prefetch=opts.prefetch, shutdown_grace_s=opts.shutdown_grace_s,
                        processes=processes, pauses=pauses_for(rt), max_tasks=opts.max_tasks)
        lag = LagMonitor(opts.lag_threshold_s) if opts.lag_threshold_s > 0 else None
        stopping = anyio.Event()

        def drain(why: str, **fields: Any) -> None:
            if not stopping.is_set():
                log.info(f"draining: {why}", worker=worker.name,
                         grace_s=opts.shutdown_grace_s, in_flight=worker.in_flight, **fields)
                stopping.set()
                worker.stop()

        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                nonlocal code
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not stopping.is_set():
                            drain("signal", signal=name)
                        else:
                            log.warning("second signal: stopping now; unfinished tasks return "
                                        "to the broker", signal=name, in_flight=worker.in_flight)
                            code = EXIT_FORCED
                            tg.cancel_scope.cancel()
                            return

            async def on_parent_gone(parent: ParentLink) -> None:
                await parent.wait_parent_gone()
                drain("the supervisor is gone")

            async def recycle(parent: ParentLink | None) -> None:
                nonlocal code
                reason = await _recycle_reason(opts, stopping)
                if reason is not None and not stopping.is_set():
                    code = EXIT_RECYCLED
                    if parent is not None:
                        parent.send("recycling", reason=reason)
                    drain("recycling", reason=reason)

            async def run_worker(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                nonlocal code
                await worker.serve(task_status=task_status)
                if worker.spent and not stopping.is_set():  # it took its max_tasks, drained
                    code = EXIT_RECYCLED
                    if link is not None:
                        link.send("recycling", reason=f"took {opts.max_tasks} tasks "
                                                      f"(max {opts.max_tasks})")
                tg.cancel_scope.cancel()

            tg.start_soon(on_signals)
            if lag is not None:
                await tg.start(lag.run)
            if link is not None:
                tg.start_soon(on_parent_gone, link)
            if opts.max_memory_bytes is not None:
                tg.start_soon(recycle, link)
            await tg.start(run_worker)
            if opts.scheduler:
                await tg.start(functools.partial(run_scheduler, rt, multiprocess=True,
                                                 name=worker.name))
            if opts.heartbeat_s > 0:
                store = store_for(rt)
                stack.push_async_callback(store.aclose)
                tg.start_soon(functools.partial(publish_heartbeats, store, worker,
                                                interval_s=opts.heartbeat_s, lag=lag))
            if link is not None:
                link.send("ready", worker=worker.name)
    return code
