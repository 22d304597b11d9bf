"""soft_timeout for kind="process" tasks (issue 13 item 6): SoftTimeLimitExceeded
is raised inside the body in its pool process (a signal), catchable; the hard
timeout still kills the process; a stray signal never breaks the next task."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import pytest

from runtime import Runtime, State, TaskError, TaskTimeLimitExceeded
from runtime.process.pool import ProcessPool
from runtime.process.pool_live import SOFT_SIGNAL
from tests.task_context import proc_live_app
from tests.task_context.proc_live_rig import APP, KINDS, LIMIT, runtime_on


@pytest.fixture(params=KINDS)
async def rt(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Runtime]:
    async for runtime in runtime_on(request.param, namespace):
        yield runtime


async def test_a_process_task_catches_its_soft_limit_and_returns(rt: Runtime) -> None:
    async with ProcessPool(APP, size=1) as pool:
        (pid,) = pool.pids
        with anyio.fail_after(LIMIT):  # the body sleeps 600 s unless the soft limit stops it
            async with rt, rt.worker(processes=pool):
                handle = await rt.enqueue(proc_live_app.cleans_up.s())
                assert await handle.result(timeout=LIMIT) == "cleaned up"
                assert await handle.status() is State.SUCCESS
                # the same pool process serves the next task
                assert await rt.run(proc_live_app.quick.s(21)) == 42
        assert pool.pids == [pid]


async def test_an_uncaught_soft_limit_fails_the_task_and_the_hard_limit_still_kills(
        rt: Runtime) -> None:
    async with ProcessPool(APP, size=1) as pool:
        (first,) = pool.pids
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool):
                try:
                    await rt.run(proc_live_app.ignores_soft.s())
                except TaskError as e:
                    soft = e
                assert pool.pids == [first]  # a soft limit never kills the process
                with pytest.raises(TaskTimeLimitExceeded):
                    await rt.run(proc_live_app.swallows_soft.s())
                # the killed process is replaced, and the replacement works
                assert await rt.run(proc_live_app.quick.s(1)) == 2
        assert pool.pids != [first]
    assert soft.info.type.endswith("SoftTimeLimitExceeded")
    assert "soft time limit of 0.3s" in str(soft)


async def test_a_stray_soft_signal_between_tasks_does_not_break_the_next_one(
        rt: Runtime) -> None:
    async with ProcessPool(APP, size=1) as pool:
        (pid,) = pool.pids
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool):
                assert await rt.run(proc_live_app.quick.s(1)) == 2
                os.kill(pid, SOFT_SIGNAL)  # as if a soft limit fired just as a task ended
                assert await rt.run(proc_live_app.quick.s(2)) == 4
                assert await rt.run(proc_live_app.cleans_up.s()) == "cleaned up"
        assert pool.pids == [pid]
