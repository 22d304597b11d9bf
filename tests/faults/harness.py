"""The fault-test harness (RELIABILITY.md §2.1): servers and workers the test owns.

- :class:`RedisServer`: a ``redis-server`` on a free port in a temp dir, AOF on
  (``appendfsync everysec``), no RDB; stop / ``kill -9`` / restart by its pid.
- :class:`RabbitNode`: an isolated RabbitMQ node (own node name, ports, mnesia,
  logs, config, cookie, no plugins); ``stop_app``/``start_app`` and ``kill -9`` of
  its own beam pid.
- :class:`WorkerPool`: ``python -m runtime.cli worker tests.faults.app:rt`` processes,
  optionally respawned when they die (a stand-in for the supervisor), killed by pid.
- :class:`Producer`: enqueues with ledger records around each publish and retries
  an indeterminate publish with the same task id.
- :func:`wait_until`: the one place that polls (see its docstring).

Only pids this module started are ever signalled, one at a time. Servers are
pinned to CPU 0 and workers to CPU 1 (``taskset``) on a machine with 2+ cores so
the brokers are not starved.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import psutil
import redis

from brokers.base import BrokerError
from runtime.app import Runtime
from runtime.canvas import Signature
from tests.faults.ledger import Ledger, LedgerView, LedgerWriter

__all__ = [
    "REPO_ROOT",
    "HarnessError",
    "Producer",
    "RabbitNode",
    "RedisServer",
    "WorkerPool",
    "describe",
    "free_port",
    "tail",
    "results_of",
    "wait_for_ledger",
    "wait_queue_settled",
    "wait_until",
    "worker_env",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The RabbitMQ scripts themselves: /usr/sbin/rabbitmq-server is a wrapper that, run
#: as root, switches to the rabbitmq user (and loses our environment and our pid).
RABBIT_BIN = Path(os.environ.get("TASKLOOM_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
_TWO_CPUS = (os.cpu_count() or 1) >= 2
_SERVER_CPU = "0"
_WORKER_CPU = "1"

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The harness could not set up a server or process (not a runtime failure)."""


# -- small helpers -------------------------------------------------------------------


def free_port(avoid: Sequence[int] = ()) -> int:
    """A free loopback TCP port in 20000-29999.

    Below the kernel's ephemeral range (32768+), so outgoing connections do not
    take it before the server binds it, and below the 35672-35682 range that
    RabbitMQ's CLI tools bind for their own Erlang distribution.
    """
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise HarnessError("no free TCP port found in 20000-29999")


def _pinned(cmd: list[str], cpu: str) -> list[str]:
    # taskset execs the command: the pid we get is the command's own pid
    return ["taskset", "-c", cpu, *cmd] if _TWO_CPUS and shutil.which("taskset") else cmd


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} unreadable>"
    return "\n".join(text.splitlines()[-lines:])


def _signal_own(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def wait_until(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], str] = lambda: "",
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until it returns a value other than None/False.

    The one polling loop of the fault suite, and why it polls: it watches
    things outside the test's event loop that offer no notification it could
    await, namely the ledger files that other processes append to and the
    server-side counters of an external broker (``rabbitmqctl list_consumers``,
    queue stats). The loop is bounded by ``anyio.fail_after(timeout)``, and on
    timeout it raises an AssertionError naming what it waited for (plus
    ``describe()``). Test bodies never sleep; they call this.
    """
    try:
        with anyio.fail_after(timeout):
            while True:
                value = await probe()
                if value is not None and value is not False:
                    return value
                await anyio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n"
                             f"{describe()}") from None


async def wait_for_ledger(
    ledger: Ledger,
    predicate: Callable[[LedgerView], bool],
    *,
    timeout: float,
    what: str,
    describe: Callable[[], str] = lambda: "",
) -> LedgerView:
    """Wait until the ledger (written by other processes) satisfies ``predicate``."""

    async def probe() -> LedgerView | None:
        view = ledger.read()
        return view if predicate(view) else None

    return await wait_until(probe, timeout=timeout, what=what, describe=describe)


# -- redis-server --------------------------------------------------------------------


class RedisServer:
    """A redis-server owned by the test: ``--appendonly yes --appendfsync everysec
    --save ""`` (``appendfsync`` may be ``always``) in its own directory, on a free
    loopback port."""

    def __init__(self, root: Path, *, port: int | None = None, appendonly: bool = True,
                 appendfsync: str = "everysec") -> None:
        if appendfsync not in ("everysec", "always", "no"):
            raise HarnessError(f"appendfsync must be everysec, always or no, not {appendfsync!r}")
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError("redis-server is not running")
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError(f"redis-server already runs as pid {self.proc.pid}")
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.dir), "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
               "--logfile", str(self.log), "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(_pinned(cmd, _SERVER_CPU), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until it answers PING (polls a server that is starting up, bounded)."""
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5,
                             socket_timeout=1.0)
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise HarnessError(f"redis-server exited with {self.proc.returncode} on "
                                       f"start:\n{tail(self.log)}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying the AOF
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise HarnessError(f"redis-server on port {self.port} did not answer PING "
                                       f"within {timeout:g}s:\n{tail(self.log)}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL (a process crash: the page cache keeps what was written)."""
        if self.proc is None:
            return
        _signal_own(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: redis shuts down cleanly (flushes the AOF)."""
        if self.proc is None:
            return
        _signal_own(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, *, kill: bool = True, down_s: float = 0.0) -> None:
        """Crash (or stop) and start again on the same port and directory after
        ``down_s`` seconds: the length of the outage is the fault's parameter
        (a restart within redis-py's own reconnect retry goes unnoticed)."""
        self.kill() if kill else self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    async def arestart(self, *, kill: bool = True, down_s: float = 0.0) -> None:
        await anyio.to_thread.run_sync(lambda: self.restart(kill=kill, down_s=down_s))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.proc = None


# -- RabbitMQ ------------------------------------------------------------------------


class RabbitNode:
    """An isolated RabbitMQ node owned by the test.

    ``rabbitmq-server`` (not ``-detached``) runs as our child: the script starts
    ``erl`` in the background and waits, so the beam is the script's child and
    we find its pid among our own descendants (no pid file is written in this
    mode). Its cookie is ``$HOME/.erlang.cookie`` with ``HOME`` set to the
    node's own directory, so the test never touches the system cookie.
    """

    def __init__(self, root: Path, *, consumer_timeout_ms: int = 60000,
                 max_message_size: int = 16 * 1024 * 1024) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = f"rt-test-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port(avoid=[self.port])
        self.consumer_timeout_ms = consumer_timeout_ms
        self.log = self.dir / "server.out"
        self.wrapper: subprocess.Popen[bytes] | None = None
        self.beam_pid: int | None = None
        self._out: IO[bytes] | None = None
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {consumer_timeout_ms}\n"
            f"max_message_size = {max_message_size}\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")  # management off
        (self.dir / "rabbitmq-env.conf").write_text("")
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    # -- process -----------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        server = RABBIT_BIN / "rabbitmq-server"
        if not server.exists():
            raise HarnessError(f"{server} not found: install rabbitmq-server to run the AMQP "
                               "fault tests")
        if self.wrapper is not None and self.wrapper.poll() is None:
            raise HarnessError(f"node {self.name} already runs (wrapper pid {self.wrapper.pid})")
        self._out = self.log.open("ab")
        self.wrapper = subprocess.Popen(_pinned([str(server)], _SERVER_CPU), env=self.env,
                                        cwd=self.dir, stdin=subprocess.DEVNULL,
                                        stdout=self._out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        self.beam_pid = self._find_beam(deadline)
        left = max(1, int(deadline - time.monotonic()))
        done = self._ctl("wait", "--pid", str(self.beam_pid), "--timeout", str(left),
                         timeout=left + 10, check=False)
        if done.returncode != 0:
            out = done.stdout.decode(errors="replace")
            self.kill()
            raise HarnessError(f"RabbitMQ node {self.name} did not start within {timeout:g}s "
                               f"(rabbitmqctl wait: {out.strip()})\n{tail(self.log)}\n"
                               f"{self._log_tail()}")

    def _find_beam(self, deadline: float) -> int:
        """The beam.smp among the wrapper's descendants (polls a starting process)."""
        assert self.wrapper is not None
        parent = psutil.Process(self.wrapper.pid)
        while True:
            if self.wrapper.poll() is not None:
                raise HarnessError(f"rabbitmq-server exited with {self.wrapper.returncode} on "
                                   f"start:\n{tail(self.log)}")
            with contextlib.suppress(psutil.Error):
                for child in parent.children(recursive=True):
                    if child.name() == "beam.smp":
                        return int(child.pid)
            if time.monotonic() > deadline:
                raise HarnessError(f"no beam.smp appeared under rabbitmq-server pid "
                                   f"{self.wrapper.pid}:\n{tail(self.log)}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return tail(self.dir / "log" / f"{self.name}.log")

    def _ctl(self, *args: str, timeout: float = 60.0, check: bool = True
             ) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
                              env=self.env, cwd=self.dir, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise HarnessError(f"rabbitmqctl {' '.join(args)} failed on {self.name} "
                               f"({done.returncode}): {done.stdout.decode(errors='replace')}")
        return done

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        return self._ctl(*args, timeout=timeout).stdout.decode(errors="replace")

    async def actl(self, *args: str, timeout: float = 60.0) -> str:
        return await anyio.to_thread.run_sync(lambda: self.ctl(*args, timeout=timeout))

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60", timeout=70)

    def kill(self) -> None:
        """SIGKILL of this node's beam (a crash), then reap the wrapper script."""
        if self.beam_pid is not None:
            _signal_own(self.beam_pid, signal.SIGKILL)
            self.beam_pid = None
        if self.wrapper is not None:
            try:
                self.wrapper.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal_own(self.wrapper.pid, signal.SIGKILL)
                self.wrapper.wait(timeout=5)
        if self._out is not None:
            self._out.close()
            self._out = None

    def restart(self) -> None:
        """Crash the node and start it again on the same ports and data."""
        self.kill()
        self.start()

    # -- inspection --------------------------------------------------------------------

    async def consumers(self, queue_part: str = "") -> int:
        """Consumers on the queues whose name contains ``queue_part``."""
        out = await self.actl("list_consumers", "-q", "queue_name", "consumer_tag")
        return sum(1 for line in out.splitlines()
                   if line.strip() and queue_part in line.split("\t")[0])

    def describe_queues(self) -> str:
        """``rabbitmqctl list_queues`` as text, for failure messages."""
        try:
            return "queues (name, type, ready, unacked, consumers):\n" + self.ctl(
                "list_queues", "-q", "name", "type", "messages_ready",
                "messages_unacknowledged", "consumers", timeout=20)
        except (HarnessError, subprocess.TimeoutExpired) as e:
            return f"<list_queues failed: {e}>"

    async def queues(self) -> dict[str, tuple[int, int, int]]:
        """name -> (ready, unacked, consumers)."""
        out = await self.actl("list_queues", "-q", "name", "messages_ready",
                              "messages_unacknowledged", "consumers")
        found: dict[str, tuple[int, int, int]] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit():
                found[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return found

    def close(self) -> None:
        """Stop the node (gracefully, else kill -9 its beam); keep the directory
        (the fixture removes it)."""
        if self.wrapper is None:
            return
        if self.wrapper.poll() is None:
            with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                self._ctl("stop", timeout=30, check=False)
            try:
                self.wrapper.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.beam_pid is not None and psutil.pid_exists(self.beam_pid):
            _signal_own(self.beam_pid, signal.SIGKILL)
        self.beam_pid = None
        if self._out is not None:
            self._out.close()
            self._out = None
        self.wrapper = None


# -- worker processes ----------------------------------------------------------------


class WorkerPool:
    """``count`` worker processes of ``tests.faults.app:rt``; with ``respawn``
    a process that dies is started again (what the supervisor will do).

    Each process's exit is written to the ledger as EXIT(target=pid, rc), each
    kill the harness makes as KILL(target=pid) before the signal.
    """

    def __init__(self, *, env: Mapping[str, str], log_dir: Path, ledger: LedgerWriter,
                 count: int = 2, concurrency: int = 4, prefetch: int | None = None,
                 respawn: bool = False, app: str = "tests.faults.app:rt",
                 shutdown_grace_s: float = 5.0) -> None:
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = ledger
        self.count = count
        self.respawn = respawn
        cmd = [sys.executable, "-m", "runtime.cli", "worker", app,
               "--concurrency", str(concurrency), "--shutdown-grace", str(shutdown_grace_s)]
        if prefetch is not None:
            cmd += ["--prefetch", str(prefetch)]
        self.cmd = _pinned(cmd, _WORKER_CPU)
        self.procs: dict[int, anyio.abc.Process] = {}
        self.exits: list[tuple[int, int | None]] = []
        self.spawned = 0
        self._closing = False
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def pids(self) -> list[int]:
        return list(self.procs)

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for slot in range(self.count):
            await self._tg.start(self._slot, slot)
        return self

    async def _slot(self, slot: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        while not self._closing:
            self.spawned += 1
            log = (self.log_dir / f"worker-{slot}-{self.spawned}.log").open("wb")
            try:
                proc = await anyio.open_process(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                env=self.env, start_new_session=True)
            finally:
                log.close()
            self.procs[proc.pid] = proc
            if not started:
                started = True
                task_status.started()
            try:
                rc = await proc.wait()
            finally:
                self.procs.pop(proc.pid, None)
            self.exits.append((proc.pid, rc))
            self.ledger.write("EXIT", target=proc.pid, rc=rc)
            if not self.respawn:
                return

    def kill(self, pid: int) -> None:
        """SIGKILL one of our worker processes."""
        if pid not in self.procs:
            raise HarnessError(f"pid {pid} is not a live worker of this pool ({self.pids})")
        self.ledger.write("KILL", target=pid)
        _signal_own(pid, signal.SIGKILL)

    def logs(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p, lines)}"
                         for p in sorted(self.log_dir.glob("worker-*.log")))

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._closing = True
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            for pid in list(self.procs):
                _signal_own(pid, signal.SIGTERM)
            with anyio.move_on_after(15):
                for proc in list(self.procs.values()):
                    await proc.wait()
            for pid in list(self.procs):
                _signal_own(pid, signal.SIGKILL)
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(exc_type, exc, tb)


# -- producer ------------------------------------------------------------------------


class Producer:
    """Enqueues signatures with ledger records around each publish.

    A publish that raises is indeterminate (it may or may not be stored): it is
    recorded as ENQ_INDET and retried with the same task id, with a capped
    exponential backoff between tries. The backoff is the producer's retry
    policy while a server is down, not a wait for work.
    """

    def __init__(self, rt: Runtime, ledger: LedgerWriter, *, max_tries: int = 60) -> None:
        self.rt = rt
        self.ledger = ledger
        self.max_tries = max_tries
        self.ok = 0
        self.indeterminate = 0
        self._thresholds: list[tuple[int, anyio.Event]] = []

    def after(self, count: int) -> anyio.Event:
        """An event set once ``count`` enqueues were confirmed."""
        event = anyio.Event()
        if self.ok >= count:
            event.set()
        else:
            self._thresholds.append((count, event))
        return event

    async def enqueue(self, key: str, signature: Signature) -> None:
        self.ledger.write("ENQ_SENT", id=key)
        delay = 0.05
        for attempt in range(1, self.max_tries + 1):
            try:
                handle = await self.rt.enqueue(signature, task_id=key)
            except BrokerError as e:
                self.indeterminate += 1
                self.ledger.write("ENQ_INDET", id=key, err=f"{type(e).__name__}: {e}"[:500],
                                  attempt=attempt)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if handle.duplicate:
                # nothing was published: the runtime found a record under this id
                # (a reservation or a result); the checker reports it (Report.refused)
                self.ledger.write("ENQ_OK", id=key, dup=True)
            else:
                self.ledger.write("ENQ_OK", id=key)
            self.ok += 1
            for count, event in self._thresholds:
                if self.ok >= count:
                    event.set()
            return
        raise AssertionError(f"enqueue of {key} failed {self.max_tries} times in a row")

    async def enqueue_all(self, items: Sequence[tuple[str, Signature]]) -> None:
        for key, sig in items:
            await self.enqueue(key, sig)

    async def enqueue_through(self, make: Callable[[int], tuple[str, Signature]],
                              fault_over: anyio.Event, *, after: int, keys: list[str]) -> None:
        """Enqueue ``make(0)``, ``make(1)``, ... until ``fault_over`` is set and
        ``after`` more were confirmed since: the load spans the whole fault
        whatever the publish rate. Appends each key to ``keys``."""
        confirmed_after = 0
        i = 0
        while not fault_over.is_set() or confirmed_after < after:
            key, sig = make(i)
            i += 1
            keys.append(key)
            await self.enqueue(key, sig)
            if fault_over.is_set():
                confirmed_after += 1


def worker_env(*, broker: str, namespace: str, ledger: Ledger, results: str | None = None
               ) -> dict[str, str]:
    env = {"TASKLOOM_FAULT_BROKER": broker, "TASKLOOM_FAULT_NS": namespace,
           "TASKLOOM_FAULT_LEDGER": str(ledger.dir)}
    if results is not None:
        env["TASKLOOM_FAULT_RESULTS"] = results
    return env


def describe(*parts: Callable[[], str]) -> Callable[[], str]:
    return lambda: "\n".join(p() for p in parts)


async def wait_queue_settled(rt: Runtime, queue: str, *, timeout: float,
                             describe_more: Callable[[], str] = lambda: "") -> None:
    """Until ``queue`` holds nothing ready, delayed or unacked (the ``stuck``
    metric is 0). Polls the broker's counters (see :func:`wait_until`)."""
    last: list[Any] = []

    async def probe() -> bool:
        stats = await rt.broker.stats(queue)
        last[:] = [stats]
        return not (stats.ready or stats.delayed or stats.in_flight)

    await wait_until(probe, timeout=timeout, what=f"queue {queue!r} to settle",
                     describe=lambda: f"last stats: {last}\n{describe_more()}")


async def results_of(rt: Runtime, keys: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """The stored Result of every key (waits on the result store, no polling)."""
    found: dict[str, Any] = {}
    with anyio.fail_after(timeout):
        for key in keys:
            found[key] = await rt.results.wait(key, timeout)
    return found


# -- TLS (issue 19 item 3) -------------------------------------------------------------


class TlsRabbitNode(RabbitNode):
    """A :class:`RabbitNode` with an SSL listener too, on :attr:`ssl_port`.

    The server presents ``cert``/``key`` (signed by ``cacert``) and verifies a
    client certificate when one is presented (``verify_peer``); with
    ``require_client_cert`` a client without one is refused (mTLS).
    """

    def __init__(self, root: Path, *, cacert: Path, cert: Path, key: Path,
                 require_client_cert: bool = False, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.ssl_port = free_port(avoid=[self.port, self.dist_port])
        with (self.dir / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"listeners.ssl.default = 127.0.0.1:{self.ssl_port}\n"
                f"ssl_options.cacertfile = {cacert}\n"
                f"ssl_options.certfile = {cert}\n"
                f"ssl_options.keyfile = {key}\n"
                "ssl_options.verify = verify_peer\n"
                f"ssl_options.fail_if_no_peer_cert = "
                f"{'true' if require_client_cert else 'false'}\n"
            )

    def tls_url(self, query: str = "") -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.ssl_port}/" + (f"?{query}" if query else "")
