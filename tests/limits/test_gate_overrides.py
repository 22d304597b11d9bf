"""While the gate serves (inside a worker), the run-time overrides are read in
the background: a task's ``admit`` never waits on them. A read in the middle of
a batch of tasks that do not suspend would suspend one of them, and the
worker's fetch and settle batches, split in two, stay split (twice the round
trips per task: issue 16's "no-op drain beside limited tasks" figure)."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

from runtime.app import Runtime
from runtime.messages import TaskMessage
from runtime.ops.limits import Limits, LimitsGate, MemoryLimitStore


class CountingStore(MemoryLimitStore):
    """Counts override reads; once ``stall`` is set, a read waits until ``go`` is."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.read = anyio.Event()
        self.stall = False
        self.go = anyio.Event()

    async def overrides(self) -> dict[str, dict[str, Any]]:
        self.reads += 1
        self.read.set()
        if self.stall:
            await self.go.wait()
        return await super().overrides()


def msg(task: str) -> TaskMessage:
    return TaskMessage(id=uuid.uuid4().hex, task=task, args=[])


@pytest.fixture
def rt() -> Runtime:
    rt = Runtime()

    @rt.task(name="free")
    async def free() -> None: ...

    @rt.task(name="limited")
    async def limited() -> None: ...

    limited.limits = Limits.of(rate_limit="1/h")  # type: ignore[attr-defined]
    return rt


async def test_admit_never_waits_on_the_overrides_while_the_gate_serves(rt: Runtime) -> None:
    store = CountingStore()
    gate = LimitsGate(rt, store, overrides_ttl_s=0.0)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.serve)
            await store.read.wait()  # serve's first read
            store.stall = True  # every read from now on hangs
            for _ in range(100):
                # no overrides read (and no await that suspends) on a task's path
                assert await gate.admit(msg("free")) is None
            assert store.reads <= 2  # serve's, none of admit's 100
            store.go.set()
            tg.cancel_scope.cancel()


async def test_a_run_time_override_reaches_a_serving_gate(rt: Runtime) -> None:
    store = CountingStore()
    gate = LimitsGate(rt, store, overrides_ttl_s=0.01)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.serve)
            await store.read.wait()
            assert await gate.admit(msg("free")) is None
            assert await gate.admit(msg("free")) is None  # no limit yet
            await store.set_override("free", {"rate_limit": "1/h"})
            seen = store.reads
            while store.reads < seen + 2:  # a read that began after the override
                store.read = anyio.Event()
                await store.read.wait()
            assert await gate.admit(msg("free")) is None  # the first of the hour
            assert await gate.admit(msg("free")) is not None  # deferred: the override holds
            tg.cancel_scope.cancel()


async def test_without_serve_a_gate_reads_the_overrides_itself(rt: Runtime) -> None:
    store = CountingStore()
    gate = LimitsGate(rt, store, overrides_ttl_s=0.0)
    await store.set_override("free", {"rate_limit": "1/h"})
    assert await gate.admit(msg("free")) is None
    assert await gate.admit(msg("free")) is not None
    assert store.reads >= 2


async def test_a_failing_read_in_the_background_keeps_the_gate_serving(rt: Runtime) -> None:
    class Broken(CountingStore):
        async def overrides(self) -> dict[str, dict[str, Any]]:
            await super().overrides()
            raise RuntimeError("a bug in the store")

    store = Broken()
    gate = LimitsGate(rt, store, overrides_ttl_s=0.01)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.serve)
            while store.reads < 3:  # it went on reading after the failures
                store.read = anyio.Event()
                await store.read.wait()
            assert await gate.admit(msg("free")) is None
            assert await gate.admit(msg("limited")) is None  # the first of its hour
            assert await gate.admit(msg("limited")) is not None
            tg.cancel_scope.cancel()
