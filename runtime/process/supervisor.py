"""The supervisor: N worker processes, kept running.

Each child is a fresh interpreter (``python -m runtime.cli worker APP
--child ...``) with its own event loop and broker connections; nothing is
forked from this process's loop and nothing is pickled. The supervisor:

- restarts a child that dies, with exponential backoff for children that die
  young (a task that kills its process every time cannot make a fork bomb);
  after ``startup_failure_limit`` children in a row die before ever becoming
  ready it gives up with :data:`~runtime.process.serve.EXIT_CRASH_LOOP`; a child that
  reports a configuration error before any child was ready ends it with
  :data:`~runtime.process.serve.EXIT_CONFIG`;
- restarts a child that exited with :data:`~runtime.process.serve.EXIT_UNREACHABLE`
  (it could not reach the broker or the result store) with capped, jittered
  backoff for as long as the outage lasts: an outage is not a crash loop, so it
  never makes the supervisor give up. One log line when children start failing
  to reach their servers, one when a child is ready again;
- replaces a child that recycled itself (it drained after its task or memory
  limit and exited with :data:`~runtime.process.serve.EXIT_RECYCLED`) at once;
- on SIGTERM or SIGINT sends SIGTERM to every child (each drains within the
  grace period) and exits 0 once they are gone; past the grace period (plus a
  margin) it kills what is left. A second signal kills every child now
  (SIGKILL; their unfinished tasks return to the broker) and exits 130.

With ``metrics_port`` (by default the ``--metrics-port`` of the child command)
it serves http://127.0.0.1:PORT/metrics itself: the sum over all its children,
through prometheus-client's multiprocess mode (see
:mod:`runtime.process.metrics_hub`); the children serve no port.

Children are in their own sessions (a terminal's Ctrl-C reaches only the
supervisor) and exit when the supervisor dies: ``PR_SET_PDEATHSIG`` and EOF
on the stdin pipe both make them drain.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence

import anyio
import anyio.abc
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

from runtime.errors import ConfigError
from runtime.process.metrics_hub import MetricsHub, metrics_port_in
from runtime.process.serve import (
    EXIT_CONFIG,
    EXIT_CRASH_LOOP,
    EXIT_FORCED,
    EXIT_OK,
    EXIT_RECYCLED,
    EXIT_UNREACHABLE,
    SUPERVISOR_PID_ENV,
)

__all__ = ["ChildExit", "Supervisor", "describe_exit"]

log = structlog.get_logger("taskloom.supervisor")


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ChildExit(msgspec.Struct, frozen=True, kw_only=True):
    """How one child ended."""

    slot: int
    pid: int
    code: int
    uptime_s: float
    ready: bool
    recycled: str | None = None
    fatal: str | None = None


class _Child:
    __slots__ = ("fatal", "pid", "process", "ready", "recycling", "slot", "started")

    def __init__(self, slot: int, process: anyio.abc.Process) -> None:
        self.slot = slot
        self.process = process
        self.pid = process.pid
        self.started = time.monotonic()
        self.ready = False
        self.recycling: str | None = None
        self.fatal: str | None = None

    def signal(self, signum: signal.Signals) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class Supervisor:
    """Runs ``command`` (a child worker's argv) in ``processes`` slots.

    ``await Supervisor(cmd, 4).run()`` returns the exit code. ``stop()`` drains
    (as SIGTERM does), ``kill()`` stops at once (as a second signal does).
    """

    def __init__(
        self,
        command: Sequence[str],
        processes: int,
        *,
        shutdown_grace_s: float = 30.0,
        kill_margin_s: float = 10.0,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 30.0,
        startup_failure_limit: int = 5,
        unreachable_backoff_max_s: float = 5.0,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        handle_signals: bool = True,
        metrics_port: int | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"a supervisor needs at least one process, got {processes}")
        if startup_failure_limit < 1:
            raise ValueError("startup_failure_limit must be at least 1")
        self.command = list(command)
        self.processes = processes
        self.shutdown_grace_s = shutdown_grace_s
        self.kill_margin_s = kill_margin_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.startup_failure_limit = startup_failure_limit
        #: longest pause before restarting a child that could not reach its servers
        self.unreachable_backoff_max_s = unreachable_backoff_max_s
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.handle_signals = handle_signals
        #: where the sum of the children's metrics is served (None: nowhere)
        self.metrics_port = metrics_port if metrics_port is not None else metrics_port_in(command)
        self._metrics: MetricsHub | None = None
        #: children started so far (restarts and replacements included)
        self.spawned = 0
        #: the most recent child exits
        self.exits: deque[ChildExit] = deque(maxlen=1000)
        self.children: dict[int, _Child] = {}
        self._code = EXIT_OK
        self._stopping = anyio.Event()
        self._killed = False
        self._ever_ready = False
        self._startup_failures = 0
        #: since when children exit unable to reach their servers (None: they can)
        self._outage_since: float | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def pids(self) -> list[int]:
        return sorted(c.pid for c in self.children.values() if c.process.returncode is None)

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Drain: SIGTERM to every child; kill what is left after the grace period."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for child in list(self.children.values()):
            child.signal(signal.SIGTERM)
        if self._tg is not None:
            self._tg.start_soon(self._kill_after, self.shutdown_grace_s + self.kill_margin_s)

    def kill(self) -> None:
        """Stop now: SIGKILL every child (their unfinished tasks return to the broker)."""
        self._stopping.set()
        self._killed = True
        self._code = EXIT_FORCED
        for child in list(self.children.values()):
            child.signal(signal.SIGKILL)

    def _fail(self, code: int) -> None:
        if self._code == EXIT_OK:
            self._code = code
        self.stop()

    async def _kill_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        if self.pids:
            log.error("worker processes did not drain within the grace period; killing them",
                      pids=self.pids, grace_s=self.shutdown_grace_s)
            self.kill()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping.is_set():
                    log.info("draining worker processes", signal=name, pids=self.pids,
                             grace_s=self.shutdown_grace_s)
                    self.stop()
                else:
                    log.warning("second signal: killing worker processes now; their unfinished "
                                "tasks return to the broker", signal=name, pids=self.pids)
                    self.kill()

    # -- running -------------------------------------------------------------------

    async def run(self) -> int:
        """Supervise until stopped; the exit code (see :mod:`runtime.process.serve`)."""
        log.info("supervisor started", pid=os.getpid(), processes=self.processes)
        if self.metrics_port is not None:
            hub = self._metrics = MetricsHub(self.metrics_port)
            try:
                hub.open(self.env)
            except ConfigError as e:
                log.error("the supervisor cannot serve metrics", error=str(e))
                return EXIT_CONFIG
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.handle_signals:
                    tg.start_soon(self._signals)
                if self._metrics is not None:
                    tg.start_soon(self._metrics.serve)
                async with anyio.create_task_group() as slots:
                    for slot in range(self.processes):
                        slots.start_soon(self._slot, slot)
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            if self._metrics is not None:
                self._metrics.close()
        log.info("supervisor stopped", code=self._code, spawned=self.spawned)
        return self._code

    async def _slot(self, slot: int) -> None:
        young_deaths = 0
        unreachable = 0  # exits in a row of this slot's children that found no server
        while not self._stopping.is_set():
            child = await self._spawn(slot)
            recycled: str | None = None
            fatal: str | None = "could not start"
            if child is None:
                code, uptime, ready, pid = -1, 0.0, False, 0
            else:
                code = await self._supervise(child)
                uptime = time.monotonic() - child.started
                ready, recycled, fatal, pid = child.ready, child.recycling, child.fatal, child.pid
                self.exits.append(ChildExit(slot=slot, pid=pid, code=code, uptime_s=uptime,
                                            ready=ready, recycled=recycled, fatal=fatal))
                if self._metrics is not None:   # its live gauges leave the sum
                    self._metrics.child_gone(pid)
            if ready:
                unreachable = 0
            if self._stopping.is_set():
                log.info("worker process exited", slot=slot, pid=pid, exit=describe_exit(code))
                return
            if code == EXIT_RECYCLED:
                log.info("worker process recycled; starting a replacement", slot=slot, pid=pid,
                         reason=recycled)
                young_deaths = 0
                continue
            if code == EXIT_UNREACHABLE:
                unreachable += 1
                delay = self._unreachable_delay(unreachable)
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("worker processes cannot reach the broker or the result "
                                "store; restarting them with backoff until they can (their "
                                "logs say which server and why)", slot=slot, pid=pid,
                                respawn_in_s=round(delay, 2))
                else:
                    log.debug("worker process still cannot reach its servers", slot=slot,
                              pid=pid, exits_in_a_row=unreachable,
                              respawn_in_s=round(delay, 2))
                with anyio.move_on_after(delay):
                    await self._stopping.wait()
                continue
            unreachable = 0
            if fatal is not None and code == EXIT_CONFIG and not self._ever_ready:
                log.error("worker processes cannot start", error=fatal)
                self._fail(EXIT_CONFIG)
                return
            if not ready:
                self._startup_failures += 1
                if self._startup_failures >= self.startup_failure_limit:
                    log.error("worker processes are crash-looping: they die before they are ready;"
                              " giving up (see their errors above)",
                              failures_in_a_row=self._startup_failures, last_exit=describe_exit(code))
                    self._fail(EXIT_CRASH_LOOP)
                    return
            young_deaths = young_deaths + 1 if uptime < self.stable_after_s else 1
            delay = min(self.backoff_base_s * 2 ** (young_deaths - 1), self.backoff_max_s)
            unhealthy = young_deaths >= 3
            (log.error if unhealthy else log.warning)(
                "worker process died; restarting it" + (" (unhealthy: it keeps dying)"
                                                        if unhealthy else ""),
                slot=slot, pid=pid, exit=describe_exit(code), uptime_s=round(uptime, 2),
                ready=ready, deaths_in_a_row=young_deaths, respawn_in_s=delay)
            with anyio.move_on_after(delay):
                await self._stopping.wait()

    def _unreachable_delay(self, exits: int) -> float:
        """Doubling from ``backoff_base_s``, capped, with jitter (children of many
        supervisors should not reconnect in lockstep when the server is back)."""
        cap: float = min(self.backoff_base_s * 2.0 ** min(exits - 1, 16),
                         self.unreachable_backoff_max_s)
        return cap * random.uniform(0.5, 1.0)

    async def _spawn(self, slot: int) -> _Child | None:
        env = dict(self.env)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env["TASKLOOM_WORKER_SLOT"] = str(slot)
        try:
            process = await anyio.open_process(self.command, stdin=-1, stdout=-1, stderr=None,
                                               env=env, cwd=self.cwd, start_new_session=True)
        except OSError as e:
            log.error("could not start a worker process", slot=slot, error=str(e),
                      command=self.command)
            return None
        self.spawned += 1
        child = self.children[slot] = _Child(slot, process)
        log.info("worker process started", slot=slot, pid=child.pid, spawned=self.spawned)
        if self._killed:
            child.signal(signal.SIGKILL)
        elif self._stopping.is_set():
            child.signal(signal.SIGTERM)
        return child

    async def _supervise(self, child: _Child) -> int:
        """Read the child's status lines until EOF; its exit code."""
        process = child.process
        assert process.stdout is not None
        status = BufferedByteReceiveStream(process.stdout)
        try:
            while True:
                try:
                    line = await status.receive_until(b"\n", 1 << 16)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound,
                        anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break
                self._on_status(child, line)
            return await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    child.signal(signal.SIGKILL)
                    await process.wait()
                await process.aclose()

    def _on_status(self, child: _Child, line: bytes) -> None:
        try:
            event = msgspec.json.decode(line, type=dict[str, object])
        except msgspec.DecodeError:
            log.warning("unreadable status line from a worker process", pid=child.pid,
                        line=line[:200])
            return
        kind = event.get("event")
        fields = {k: v for k, v in event.items() if k not in ("event", "pid")}
        if kind == "ready":
            child.ready = True
            self._ever_ready = True
            self._startup_failures = 0
            log.info("worker process ready", slot=child.slot, pid=child.pid,
                     worker=fields.get("worker"))
            if self._outage_since is not None:
                log.warning("worker processes reach their servers again",
                            down_s=round(time.monotonic() - self._outage_since, 2))
                self._outage_since = None
        elif kind == "recycling":
            child.recycling = str(fields.get("reason"))
            log.info("worker process recycling", slot=child.slot, pid=child.pid,
                     reason=child.recycling)
        elif kind == "fatal":
            child.fatal = str(fields.get("error"))
