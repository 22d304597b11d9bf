"""Through a real worker (memory broker, the gate in ``rt.gates``): a task over
its limit waits in the broker's delay store, not in a worker slot, so other
tasks keep running; per-key concurrency holds inside one worker's runners."""

from __future__ import annotations

import time
from datetime import timedelta

import anyio

from runtime.app import Runtime
from runtime.ops.limits import Limits, LimitsGate, parse_rate


async def test_a_rate_limited_task_waits_in_the_broker_while_others_run() -> None:
    rt = Runtime()
    starts: list[float] = []
    noops: list[float] = []

    @rt.task(name="api")
    async def api(n: int) -> None:
        starts.append(time.monotonic())

    @rt.task(name="noop")
    async def noop(n: int) -> None:
        noops.append(time.monotonic())

    api.limits = Limits.of(rate_limit="20/s")  # type: ignore[attr-defined]
    gate = LimitsGate(rt)
    rt.gates.append(gate)
    async with rt:
        await rt.enqueue_many([api.s(n) for n in range(40)])
        await rt.enqueue_many([noop.s(n) for n in range(200)])
        async with rt.worker(concurrency=10) as worker:
            with anyio.fail_after(60):  # generous: 40 starts at 20/s take 2 s
                while len(starts) < 40 or len(noops) < 200:
                    await anyio.sleep(0.05)
    # the no-op tasks did not queue behind the waiting ones: all done before the limited half
    assert max(noops) < sorted(starts)[20]
    assert worker.deferred > 0 and gate.deferred["rate"] == worker.deferred
    r = parse_rate("20/s")
    worst = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert worst <= r.window_max


async def test_concurrency_per_key_holds_inside_a_worker() -> None:
    rt = Runtime()
    running: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    done: list[str] = []

    @rt.task(name="rebuild")
    async def rebuild(tenant: str) -> None:
        running[tenant] += 1
        peak[tenant] = max(peak[tenant], running[tenant])
        await anyio.sleep(0.02)
        running[tenant] -= 1
        done.append(tenant)

    rebuild.limits = Limits.of(concurrency_limit=2, concurrency_key="tenant",  # type: ignore[attr-defined]
                               lease=timedelta(seconds=5))
    rt.gates.append(LimitsGate(rt, retry_s=0.05))
    async with rt:
        await rt.enqueue_many([rebuild.s("a" if n % 2 else "b") for n in range(40)])
        async with rt.worker(concurrency=20):
            with anyio.fail_after(60):  # generous: 20 per key, 2 at a time, 20 ms each
                while len(done) < 40:
                    await anyio.sleep(0.05)
    assert peak == {"a": 2, "b": 2}
