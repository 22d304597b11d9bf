"""What the index and the events cost the hot path: no-op throughput and this
process's CPU per task on Redis with the listeners on and off, printed side by
side (no timing is asserted: the machine is shared; ``python -m
benchmarks.index_cost`` is the measurement). With them on, every task ends up in
the index, and every one of its transitions in the event stream."""

from __future__ import annotations

import time

import anyio
import pytest

from runtime import Runtime
from runtime.lifecycle import Phase
from runtime.ops.api import Operations, listeners_for
from runtime.ops.events import TaskEvent
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up

pytestmark = [pytest.mark.redis, pytest.mark.slow]
N = 2_000


async def _run(namespace: str, with_ops: bool) -> tuple[float, float, int, int]:
    # both off by default here (they are on by default): added below for "on" only
    rt = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace, index=False, events=False)

    @rt.task(name="noop", queue="cost")
    async def noop(i: int) -> int:
        return i

    if with_ops:
        rt.listeners.extend(listeners_for(rt))
    done, streamed = -1, -1
    try:
        async with rt:
            start, cpu = time.perf_counter(), time.process_time()
            with anyio.fail_after(300):  # a bound for a loaded 2-core machine
                for i in range(0, N, 500):
                    await rt.enqueue_many([noop.s(j) for j in range(i, i + 500)])
                async with rt.worker(queues=["cost"], concurrency=50) as w:
                    await w.idle()
            took, cpu = time.perf_counter() - start, time.process_time() - cpu
            if with_ops:
                async with Operations(rt) as ops:
                    with anyio.fail_after(60):
                        while (done := await ops.count(Phase.SUCCEEDED)) < N:
                            await anyio.sleep(0.05)
                        streamed = 0
                        async for rec in ops.events(since="0"):
                            streamed += isinstance(rec.event, TaskEvent)
                            if streamed == 3 * N:  # enqueued, started, succeeded
                                break
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]
    finally:
        await purge_ops(namespace)
    return N / took, cpu / N * 1e6, done, streamed


async def test_noop_throughput_with_the_index_and_events_on_and_off(namespace: str) -> None:
    await redis_up()
    off, off_cpu, _, _ = await _run(namespace + "off", False)
    on, on_cpu, indexed, streamed = await _run(namespace + "on", True)
    print(f"\n[ops cost] no-op on Redis, {N} tasks: off {off:,.0f}/s {off_cpu:.0f} us CPU/task, "
          f"index+events on {on:,.0f}/s {on_cpu:.0f} us CPU/task "
          f"({(1 - on / off) * 100:+.1f}% throughput)")
    assert indexed == N and streamed == 3 * N
