"""current_task() and cancellation in kind="process" tasks (issue 13 items 1 and 7)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from runtime import State, TaskCancelled
from runtime.process.pool import ProcessPool
from tests.task_context import proc_app

APP = "tests.task_context.proc_app:rt"
LIMIT = 60.0  # pool processes import the app fresh: seconds on a loaded machine


async def test_process_task_sees_its_context_and_returns_meta() -> None:
    rt = proc_app.rt
    async with ProcessPool(APP, size=1) as pool:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool):
                handle = await rt.enqueue(proc_app.whoami.s(5))
                out = await handle.result(timeout=LIMIT)
                info = await handle.info()
    assert out == {"id": handle.id, "name": proc_app.whoami.name, "attempt": 1,
                   "queue": "default", "x": 5}
    assert info is not None and info.meta == {"pid_seen": True}
    assert info.progress is not None and info.progress.message == "done"


async def test_cancel_kills_and_replaces_the_pool_process(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    rt = proc_app.rt
    async with ProcessPool(APP, size=1) as pool:
        (first,) = pool.pids
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool) as worker:
                handle = await rt.enqueue(proc_app.forever.s(str(marker)))
                while not marker.exists():  # the body runs in the pool process
                    await anyio.sleep(0.02)
                assert await handle.cancel()
                with pytest.raises(TaskCancelled):
                    await handle.result(timeout=LIMIT)
                while not (len(pool.pids) == 1 and pool.pids[0] != first):
                    await anyio.sleep(0.05)
                await worker.idle()
                assert await handle.status() is State.REVOKED
                stats = await rt.broker.stats("default")
    assert (stats.ready, stats.in_flight, stats.dead) == (0, 0, 0)
