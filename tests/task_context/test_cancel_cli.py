"""``handle.cancel()`` from this process stops a running async task on a
``taskloom worker`` in another process (issue 13, "Done when"): on Redis
(broker and results) and on RabbitMQ with Redis results.

The worker's task appends ``started``, then sleeps 60 s, then ``after`` to a
ledger file (outside the system under test); a ``stopped`` line written as the
body unwinds says when it ended. ``after`` never appears, the body stops within
1 s of the cancel, the task ends REVOKED, and the same worker runs a next task.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from runtime import State, TaskCancelled
from tests.conftest import AMQP_URL, REDIS_URL
from tests.task_context.cli_cancel_app import LONG, NOTE, build

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180)]

APP = "tests.task_context.cli_cancel_app:rt"
#: The issue's promise: the body stops within 1 s of the cancel. A pub/sub
#: broadcast and a cancel scope take milliseconds, so 1 s is already generous
#: on a loaded machine; it is the promise itself, hence asserted.
STOP_WITHIN_S = 1.0
#: Bound on waits that include starting a fresh interpreter on a loaded machine.
LIMIT = 60.0

BROKERS = [
    pytest.param((REDIS_URL, ""), id="redis"),
    pytest.param((AMQP_URL, REDIS_URL), id="amqp", marks=pytest.mark.amqp),
]


@pytest.fixture(params=BROKERS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    broker, results = request.param
    yield dict(os.environ, CANCEL_BROKER=broker, CANCEL_RESULTS=results,
               CANCEL_NS=f"cc{uuid.uuid4().hex[:8]}",
               CANCEL_LEDGER=str(tmp_path / "ledger.txt"))


def _lines(env: dict[str, str]) -> list[list[str]]:
    path = Path(env["CANCEL_LEDGER"])
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def _wait_line(env: dict[str, str], kind: str, tag: str) -> list[str]:
    with anyio.fail_after(LIMIT):
        while True:
            for line in _lines(env):
                if line[:2] == [kind, tag]:
                    return line
            await anyio.sleep(0.02)  # polling a file outside the system under test


async def test_cancel_stops_a_running_async_task_on_a_cli_worker_in_another_process(
        env: dict[str, str]) -> None:
    rt = build(env["CANCEL_BROKER"], env["CANCEL_RESULTS"], env["CANCEL_NS"],
               env["CANCEL_LEDGER"])
    worker = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "worker", APP, "--concurrency", "5",
         "--heartbeat", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async with rt:
            handle = await rt.enqueue(rt.signature(LONG, "first"))
            await _wait_line(env, "started", "first")
            with anyio.fail_after(LIMIT):
                while await handle.status() is not State.STARTED:
                    await anyio.sleep(0.05)  # the STARTED record is written off the hot path
            cancel_at = time.time()
            assert await handle.cancel()
            stopped = await _wait_line(env, "stopped", "first")
            with pytest.raises(TaskCancelled):
                await handle.result(timeout=LIMIT)
            assert await handle.status() is State.REVOKED

            # the worker is still up and runs the next task
            nxt = await rt.enqueue(rt.signature(NOTE, "second"))
            assert await nxt.result(timeout=LIMIT) == "second"
            assert worker.poll() is None

            # the worker's clock and ours are the same machine's
            assert float(stopped[2]) - cancel_at < STOP_WITHIN_S, stopped
            assert stopped[3] == "CancelledError", stopped
            # the body has unwound (the "stopped" line), so "after" can never come
            assert [line[0] for line in _lines(env)] == ["started", "stopped", "note"]
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=LIMIT)
        async with rt:  # delete the namespace once the worker has let go of its queues
            for part in (rt.broker, rt.results):
                purge_namespace = getattr(part, "purge_namespace", None)
                if purge_namespace is not None:
                    await purge_namespace()
    assert worker.returncode == 0, out
