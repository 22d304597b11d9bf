"""``@rt.task(schedule=..., misfire=...)``: a task declared periodic runs from
``run_scheduler``; ``from runtime import Runtime, cron, every`` (the README's)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from functools import partial

import anyio

from runtime import Runtime, cron, every
from runtime.ops.scheduler import run_scheduler


async def test_a_task_declared_with_a_schedule_runs_from_the_scheduler() -> None:
    rt = Runtime()
    ticks: list[float] = []

    @rt.task(name="beat", schedule=every(timedelta(seconds=1)), misfire="run_once")
    async def beat() -> None:
        ticks.append(anyio.current_time())

    @rt.task(name="nightly", schedule=cron("0 3 * * *"))
    async def nightly() -> None: ...

    assert set(rt.schedules.declared) == {"beat", "nightly"}
    async with rt, rt.worker(), anyio.create_task_group() as tg:
        await tg.start(partial(run_scheduler, rt))
        with anyio.fail_after(60):  # generous: a tick a second on a busy machine
            while len(ticks) < 2:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert len(ticks) >= 2


def test_the_readme_import_works_and_import_runtime_loads_no_redis() -> None:
    code = ("import sys, runtime\n"
            "assert 'redis' not in sys.modules, 'import runtime loaded redis'\n"
            "from runtime import Runtime, cron, every\n"
            "assert callable(cron) and callable(every) and Runtime\n")
    subprocess.run([sys.executable, "-c", code], check=True)
