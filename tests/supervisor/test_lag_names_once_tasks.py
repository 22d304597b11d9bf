"""The loop-lag monitor names the blocking task from what the worker records
(runtime.execution.running), not from a frame it matches by name: so it also
names an at-most-once task (a chord body), whose body runs in a child task
that keeps its claim, away from the runner's own frames."""

from __future__ import annotations

import gc
import time

import anyio

from runtime import Runtime, chord
from runtime.execution import running
from runtime.process.lag import LagMonitor


async def test_the_lag_monitor_names_a_blocking_chord_body() -> None:
    rt = Runtime()

    @rt.task(name="lagonce.member")
    async def member(x: int) -> int:
        return x

    @rt.task(name="lagonce.body")
    async def body(values: list[int]) -> int:
        time.sleep(0.6)  # blocking the loop on purpose
        return sum(values)

    monitor = LagMonitor(threshold_s=0.1)
    gc.collect()  # see test_lag_liveness: a collection at the wrong time hides the sample
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        async with rt, rt.worker() as worker:
            # generous: a loaded 2-core machine; the body itself takes 0.6 s
            with anyio.fail_after(30):
                handle = await rt.enqueue(chord([member.s(1), member.s(2)], body.s()))
                assert await handle.result() == 3
                await worker.idle()
        tg.cancel_scope.cancel()
    named = [s for s in monitor.stalls if s.task == "lagonce.body"]
    assert named, list(monitor.stalls)
    assert named[0].task_id == handle.id
    assert named[0].where is not None and "body" in named[0].where
    assert running == {}  # every runner cleared what it recorded
