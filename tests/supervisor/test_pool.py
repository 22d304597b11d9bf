"""ProcessPool: kind="process" tasks in fresh interpreters, by task name, no pickle."""

from __future__ import annotations

import anyio
import psutil
import pytest

from runtime.errors import ConfigError, TaskError, TaskTimeLimitExceeded
from runtime.execution import TimeLimit
from runtime.process.pool import PoolProcessDied, ProcessPool, RemoteTaskError, remote_error
from tests.supervisor import app
from tests.supervisor.conftest import APP, pid_alive, wait_until


async def test_process_tasks_run_in_the_pool_and_return_values() -> None:
    async with ProcessPool(APP, size=2) as pool:
        pids = set(pool.pids)
        async with app.rt, app.rt.worker(processes=pool):
            with anyio.fail_after(30):
                assert await app.rt.run(app.crunch.s(15)) == 610
                out = await app.rt.run(app.echo.s([1, 2, 3], 2))
    # arguments were converted again in the child, the print did not break a frame
    assert out["sum"] == 12.0
    assert out["pid"] in pids


async def test_a_task_over_its_time_limit_has_its_process_killed_and_replaced() -> None:
    async with ProcessPool(APP, size=1) as pool:
        (first,) = pool.pids
        async with app.rt, app.rt.worker(processes=pool):
            with anyio.fail_after(30), pytest.raises(TaskTimeLimitExceeded):
                await app.rt.run(app.spin.s("x"))
            await wait_until(lambda: len(pool.pids) == 1 and pool.pids[0] != first,
                             what="a replacement pool process")
            assert not pid_alive(first)
            # the replacement serves the next call
            with anyio.fail_after(30):
                assert await app.rt.run(app.crunch.s(10)) == 55
        assert pool.started == 2


async def test_the_runner_raises_time_limit_directly() -> None:
    async with ProcessPool(APP, size=1) as pool:
        with anyio.fail_after(30), pytest.raises(TimeLimit):
            await pool.run(app.spin.fn, ("y",), {}, 0.2)


async def test_errors_come_back_by_type_name_with_the_remote_traceback() -> None:
    async with ProcessPool(APP, size=1) as pool:
        with anyio.fail_after(30), pytest.raises(ValueError) as caught:
            await pool.run(app.fails.fn, (3,), {}, None)
        assert isinstance(caught.value, RemoteTaskError)
        assert str(caught.value) == "bad value 3"
        assert "in fails" in caught.value.remote_traceback
        async with app.rt, app.rt.worker(processes=pool):
            with anyio.fail_after(30), pytest.raises(TaskError) as failed:
                await app.rt.run(app.fails.s(4))
    assert failed.value.info.type == "ValueError"
    assert "raise ValueError" in (failed.value.info.traceback or "")


async def test_a_pool_process_that_dies_is_reported_and_replaced() -> None:
    async with ProcessPool(APP, size=1) as pool:
        (first,) = pool.pids
        with anyio.fail_after(30), pytest.raises(PoolProcessDied, match="exit code 9"):
            await pool.run(app.pool_exit.fn, (9,), {}, None)
        await wait_until(lambda: pool.pids and pool.pids[0] != first, what="a replacement")
        with anyio.fail_after(30):
            assert await pool.run(app.crunch.fn, (12,), {}, None) == 144


async def test_pool_processes_exit_with_the_pool() -> None:
    async with ProcessPool(APP, size=2) as pool:
        pids = pool.pids
        assert all(pid_alive(p) for p in pids)
    assert not any(pid_alive(p) for p in pids)


async def test_a_function_that_is_no_task_of_the_app_is_refused() -> None:
    def stray() -> None: ...

    async with ProcessPool(APP, size=1) as pool:
        with pytest.raises(ConfigError, match="not a task of"):
            await pool.run(stray, (), {}, None)


async def test_an_app_that_cannot_be_loaded_fails_at_start() -> None:
    with pytest.raises(ConfigError, match="cannot import"):
        async with ProcessPool("tests.supervisor.no_such_module:rt", size=1):
            pass
    with pytest.raises(ConfigError, match="module:attribute"):
        ProcessPool("no-colon", size=1)


async def test_pool_children_die_with_their_parent(tmp_path: object) -> None:
    """PR_SET_PDEATHSIG: a pool process outlives no parent (checked on a pool
    whose parent is a short-lived interpreter killed with SIGKILL)."""
    import subprocess
    import sys

    from tests.supervisor.conftest import ROOT

    script = (
        "import anyio, sys\n"
        "from runtime.process.pool import ProcessPool\n"
        "async def main():\n"
        f"    async with ProcessPool({APP!r}, size=2) as pool:\n"
        "        print(' '.join(map(str, pool.pids)), flush=True)\n"
        "        await anyio.sleep_forever()\n"
        "anyio.run(main)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
    try:
        assert parent.stdout is not None
        line = await anyio.to_thread.run_sync(parent.stdout.readline)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        assert all(psutil.Process(p).ppid() == parent.pid for p in pids)
        parent.kill()
        parent.wait(timeout=10)
        await wait_until(lambda: not any(pid_alive(p) for p in pids), 20,
                         "pool processes to die with their parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


def test_remote_errors_keep_the_type_name_and_match_builtin_types() -> None:
    err = remote_error("KeyError", "'k'", "Traceback ...")
    assert isinstance(err, KeyError) and isinstance(err, RemoteTaskError)
    assert type(err).__qualname__ == "KeyError" and type(err).__module__ == "builtins"
    assert str(err) == "'k'"
    os_err = remote_error("FileNotFoundError", "gone")
    assert isinstance(os_err, OSError)
    unknown = remote_error("some.unimported.module.Boom", "boom")
    assert type(unknown).__module__ == "some.unimported.module"
    assert type(unknown).__qualname__ == "Boom"
    assert not isinstance(unknown, KeyError)
    custom = remote_error("runtime.errors.ConfigError", "bad")
    assert isinstance(custom, ConfigError)
