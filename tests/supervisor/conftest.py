"""Helpers of the supervisor tests: `taskloom worker` subprocesses, the ledger,
bounded waiting, and Redis namespaces cleaned up after each test.

Every wait is bounded by ``anyio.fail_after``; waiting on another process
(a ledger line, a log line, a pid's exit) checks its condition every 50 ms.
Only pids these helpers started are ever signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from tests.conftest import REDIS_URL, server_missing

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.supervisor.app:rt"
#: upper bound of any wait; never a timing assertion
WAIT_S = 60.0


async def wait_until(predicate: Callable[[], Any], timeout: float = WAIT_S,
                     what: str = "a condition") -> Any:
    """Return the first truthy value of ``predicate()``; fail after ``timeout``."""
    try:
        with anyio.fail_after(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                await anyio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a console line, or a line being written
    return out


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.path) if kind is None or r["k"] == kind]

    def keys(self, kind: str) -> list[str]:
        return [r["key"] for r in self.records(kind)]


class WorkerCommand:
    """One ``taskloom worker`` (or other) command run as a subprocess, logging
    JSON lines to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "--log-json", *args],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.pid = self.proc.pid
        self._started: set[int] = {self.pid}

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.log_path) if event is None or r.get("event") == event]

    def deaths(self) -> list[dict[str, Any]]:
        """The supervisor's reports of children that died unexpectedly."""
        return [r for r in self.logs()
                if str(r.get("event", "")).startswith("worker process died; restarting it")]

    def child_pids(self) -> list[int]:
        """Pids of worker processes this supervisor reported starting."""
        pids = [r["pid"] for r in self.logs("worker process started")]
        self._started.update(pids)
        return pids

    def ready_pids(self) -> list[int]:
        return [r["pid"] for r in self.logs("worker process ready")]

    def live_children(self) -> list[int]:
        return [pid for pid in self.child_pids() if pid_alive(pid)]

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    async def wait(self, timeout: float = WAIT_S) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, f"{self.pid} to exit")
        return self.proc.returncode

    def close(self) -> None:
        """Kill what this command started and is still running."""
        self.child_pids()
        for pid in sorted(self._started - {self.pid}):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Env:
    """Environment for the test app in worker processes."""

    def __init__(self, tmp_path: Path, broker: str = "memory://", namespace: str = "") -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.namespace = namespace
        self.ledger = Ledger(tmp_path / "ledger.jsonl")
        self._commands: list[WorkerCommand] = []

    def vars(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TASKLOOM_TEST_BROKER=self.broker, TASKLOOM_TEST_NS=self.namespace,
                   TASKLOOM_TEST_LEDGER=str(self.ledger.path),
                   PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
        return env

    def start(self, *args: str) -> WorkerCommand:
        n = len(self._commands)
        cmd = WorkerCommand(list(args), self.vars(), self.tmp_path / f"log{n}.jsonl")
        self._commands.append(cmd)
        return cmd

    def run(self, *args: str, timeout: float = WAIT_S,
            columns: int = 200) -> subprocess.CompletedProcess[str]:
        env = self.vars()
        env["COLUMNS"] = str(columns)  # rich tables: wide enough not to elide
        return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def close(self) -> None:
        for cmd in self._commands:
            cmd.close()


@pytest.fixture
def memory_env(tmp_path: Path) -> Iterator[Env]:
    env = Env(tmp_path)
    try:
        yield env
    finally:
        env.close()


@pytest.fixture
async def redis_env(tmp_path: Path, namespace: str) -> AsyncIterator[Env]:
    """Worker processes sharing the Redis broker (short leases so that the
    deliveries of a killed process come back quickly)."""
    import brokers

    url = f"{REDIS_URL}?lease_s=1&max_deliveries=3"
    broker: Any = brokers.from_url(url, namespace=namespace)
    try:
        await broker.__aenter__()
    except Exception as e:
        server_missing("Redis", e)
    env = Env(tmp_path, broker=url, namespace=namespace)
    try:
        yield env
    finally:
        env.close()
        await broker.purge_namespace()
        await broker.__aexit__(None, None, None)
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
