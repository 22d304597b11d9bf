"""`taskloom worker` as a process tree, on the memory broker (no shared state
needed): startup errors, crash loops, signals, parent death, inspection commands."""

from __future__ import annotations

import json
import signal

import anyio
import psutil
import pytest

from runtime.process.serve import EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_FORCED, EXIT_OK
from tests.supervisor.conftest import APP, Env, pid_alive, wait_until

pytestmark = pytest.mark.slow

FAST = ("--pool-size", "0", "--heartbeat", "0.5")


async def test_an_app_that_cannot_load_exits_1_in_process(memory_env: Env) -> None:
    cmd = memory_env.start("worker", "tests.supervisor.bad_app:rt")
    assert await cmd.wait() == EXIT_CONFIG
    assert any("not a taskloom Runtime" in str(r.get("error")) for r in cmd.logs())


async def test_an_app_that_cannot_load_exits_1_under_a_supervisor(memory_env: Env) -> None:
    cmd = memory_env.start("worker", "tests.supervisor.no_such_module:rt", "--processes", "2")
    assert await cmd.wait() == EXIT_CONFIG
    assert cmd.logs("worker processes cannot start")
    assert len(cmd.child_pids()) <= 2  # a config error is not retried


async def test_children_crashing_at_import_back_off_then_the_supervisor_gives_up(
        memory_env: Env) -> None:
    cmd = memory_env.start("worker", "tests.supervisor.crash_app:rt", "--processes", "2",
                           *FAST)
    assert await cmd.wait() == EXIT_CRASH_LOOP
    assert cmd.logs("worker processes are crash-looping: they die before they are ready; "
                    "giving up (see their errors above)")
    # no fork bomb: the limit is 5 failures in a row, the other slot may add one
    spawned = cmd.child_pids()
    assert 5 <= len(spawned) <= 6
    assert 5 <= len(memory_env.ledger.records("IMPORT")) <= len(spawned)
    delays: dict[int, list[float]] = {}
    for r in cmd.deaths():
        delays.setdefault(r["slot"], []).append(r["respawn_in_s"])
    assert delays and all(d == sorted(d) for d in delays.values())
    assert max(max(d) for d in delays.values()) > min(min(d) for d in delays.values())
    assert not any(pid_alive(p) for p in spawned)


async def test_sigterm_drains_every_child_and_exits_0(memory_env: Env) -> None:
    cmd = memory_env.start("worker", APP, "--processes", "2", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    children = cmd.child_pids()
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK
    assert not any(pid_alive(p) for p in children)
    assert len(cmd.logs("draining: signal")) == 2  # each child drained


async def test_a_second_signal_kills_the_children_and_exits_130(memory_env: Env) -> None:
    cmd = memory_env.start("worker", APP, "--processes", "2", "--shutdown-grace", "60", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    children = cmd.child_pids()
    for pid in children:  # hold each child in its drain: SIGSTOP is ours to send
        psutil.Process(pid).suspend()
    cmd.signal(signal.SIGTERM)
    await wait_until(lambda: cmd.logs("draining worker processes"), what="the drain")
    cmd.signal(signal.SIGINT)
    assert await cmd.wait() == EXIT_FORCED
    await wait_until(lambda: not any(pid_alive(p) for p in children), what="children gone")


async def test_a_killed_supervisor_takes_its_children_with_it(memory_env: Env) -> None:
    cmd = memory_env.start("worker", APP, "--processes", "2", "--pool-size", "1",
                           "--heartbeat", "0.5")
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    tree = [p.pid for p in psutil.Process(cmd.pid).children(recursive=True)]
    assert len(tree) == 4  # two workers, each with a pool process
    cmd.signal(signal.SIGKILL)
    await cmd.wait()
    await wait_until(lambda: not any(pid_alive(p) for p in tree), 30,
                     "every worker and pool process to exit")


async def test_a_child_killed_by_a_signal_is_replaced(memory_env: Env) -> None:
    cmd = memory_env.start("worker", APP, "--processes", "2", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    victim = cmd.ready_pids()[0]
    psutil.Process(victim).kill()
    await wait_until(lambda: len(cmd.ready_pids()) == 3, what="a replacement child")
    assert victim not in cmd.live_children()
    assert len(cmd.live_children()) == 2
    died = cmd.deaths()
    assert died and died[0]["pid"] == victim and died[0]["exit"] == "killed by SIGKILL"
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


async def test_in_process_worker_drains_on_sigterm(memory_env: Env) -> None:
    cmd = memory_env.start("worker", APP, *FAST)
    await wait_until(lambda: cmd.logs("worker started"), what="the worker")
    assert cmd.logs("supervisor started") == []  # one process: no supervisor
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


def test_status_purge_and_dlq_on_the_memory_broker(memory_env: Env) -> None:
    status = memory_env.run("status", APP)
    assert status.returncode == 0, status.stderr
    assert "workers (0 live)" in status.stdout and "default" in status.stdout
    purge = memory_env.run("purge", APP, "--queue", "default", "--yes")
    assert purge.returncode == 0 and "purged 0 message(s) from default" in purge.stdout
    dlq = memory_env.run("dlq", APP, "--queue", "default")
    assert dlq.returncode == 0 and "dead letters of default (0 shown)" in dlq.stdout


def test_purge_asks_first(memory_env: Env) -> None:
    purge = memory_env.run("purge", APP, "--queue", "default")
    assert purge.returncode == 1 and "Aborted" in purge.stderr


def test_bad_options_are_usage_errors(memory_env: Env) -> None:
    bad = memory_env.run("worker", APP, "--max-memory-per-child", "lots")
    assert bad.returncode == 2 and "512MiB" in bad.stderr


async def test_a_child_reports_ready_and_drains_at_eof_on_its_stdin(memory_env: Env) -> None:
    """The child's side of the link: a status line on its stdout, and EOF on
    stdin (the supervisor is gone) makes it drain and exit 0."""
    import subprocess
    import sys

    from tests.supervisor.conftest import ROOT

    child = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "worker", APP, "--child", *FAST],
        cwd=ROOT, env=memory_env.vars(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    try:
        assert child.stdout is not None and child.stdin is not None
        line = await anyio.to_thread.run_sync(child.stdout.readline)
        status = json.loads(line)
        assert status["event"] == "ready" and status["pid"] == child.pid
        child.stdin.close()
        await wait_until(lambda: child.poll() is not None, what="the child to exit")
        assert child.returncode == EXIT_OK
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
