"""The two seams: lifecycle listeners (runtime.lifecycle) and admission gates
(runtime.admission), and the worker's inspection data."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from runtime import Reject, Runtime, State, TaskError, group
from runtime.lifecycle import Phase, Transition
from runtime.messages import TaskMessage
from tests.runtime.helpers import LIMIT


class Recorder:
    """A listener that records every transition, and its serve/aclose calls."""

    def __init__(self) -> None:
        self.seen: list[Transition] = []
        self.serving = False
        self.closed = 0
        self._heard = anyio.Event()

    def transition(self, t: Transition, /) -> None:
        self.seen.append(t)
        self._heard.set()
        self._heard = anyio.Event()

    async def serve(self) -> None:
        self.serving = True
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        assert not self.serving or self.closed == 0
        self.closed += 1

    def phases(self, task_id: str) -> list[Phase]:
        return [t.phase for t in self.seen if t.id == task_id]

    async def until(self, task_id: str, phase: Phase) -> None:
        while phase not in self.phases(task_id):
            await self._heard.wait()


@pytest.fixture
def rec(rt: Runtime) -> Recorder:
    r = Recorder()
    rt.listeners.append(r)
    return r


async def test_listener_serves_while_open_and_closes_once(rt: Runtime, rec: Recorder) -> None:
    with anyio.fail_after(LIMIT):
        async with rt:
            await anyio.sleep(0)
            assert rec.serving and rec.closed == 0
    assert rec.closed == 1


async def test_success_phases(rt: Runtime, rec: Recorder) -> None:
    @rt.task
    async def add(x: int, y: int) -> int:
        return x + y

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(add.s(1, 2))
            assert await handle == 3
            await rec.until(handle.id, Phase.SUCCEEDED)
    assert rec.phases(handle.id) == [Phase.ENQUEUED, Phase.STARTED, Phase.SUCCEEDED]
    started = next(t for t in rec.seen if t.phase is Phase.STARTED)
    assert (started.task, started.queue, started.worker) == (add.name, "default", worker.name)


async def test_retry_then_success_phases(rt: Runtime, rec: Recorder) -> None:
    tries: list[int] = []

    @rt.task(retries=2, backoff=0.05, jitter=0)
    async def flaky() -> str:
        tries.append(1)
        if len(tries) < 2:
            raise ConnectionError("not yet")
        return "ok"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            handle = await rt.enqueue(flaky.s())
            assert await handle == "ok"
            await rec.until(handle.id, Phase.SUCCEEDED)
    assert rec.phases(handle.id) == [Phase.ENQUEUED, Phase.STARTED, Phase.RETRYING,
                                     Phase.STARTED, Phase.SUCCEEDED]
    retrying = next(t for t in rec.seen if t.phase is Phase.RETRYING)
    assert retrying.eta_ms is not None and retrying.eta_ms >= retrying.at_ms + 40
    assert (retrying.error_type, retrying.attempt) == ("ConnectionError", 1)
    assert [t.attempt for t in rec.seen if t.phase is Phase.STARTED] == [1, 2]


async def test_failure_and_dead_letter_phases(rt: Runtime, rec: Recorder) -> None:
    @rt.task
    async def broken() -> None:
        raise ValueError("broken")

    @rt.task
    async def refuses() -> None:
        raise Reject("not for us")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            failed = await rt.enqueue(broken.s())
            rejected = await rt.enqueue(refuses.s())
            for h in (failed, rejected):
                with pytest.raises(TaskError):
                    await h
            await worker.idle()
    assert rec.phases(failed.id) == [Phase.ENQUEUED, Phase.STARTED, Phase.FAILED]
    end = next(t for t in rec.seen if t.phase is Phase.FAILED)
    assert (end.error_type, end.error) == ("ValueError", "broken")
    assert rec.phases(rejected.id) == [Phase.ENQUEUED, Phase.STARTED, Phase.DEAD_LETTERED]
    dead = next(t for t in rec.seen if t.phase is Phase.DEAD_LETTERED)
    assert dead.reason == "rejected"


async def test_revoked_and_expired_phases(rt: Runtime, rec: Recorder) -> None:
    @rt.task
    async def noop() -> None:
        return None

    with anyio.fail_after(LIMIT):
        async with rt:
            later = await rt.enqueue(noop.s(), countdown=0.2)
            assert await later.cancel()
            stale = await rt.enqueue(noop.s(), expires=0.001)
            await anyio.sleep(0.01)  # let it expire before a worker exists
            async with rt.worker() as worker:
                await rec.until(later.id, Phase.REVOKED)
                await rec.until(stale.id, Phase.EXPIRED)
                await worker.idle()
    assert rec.phases(later.id) == [Phase.SCHEDULED, Phase.REVOKED]
    scheduled = rec.seen[0]
    assert scheduled.eta_ms is not None and scheduled.eta_ms >= scheduled.at_ms + 150
    assert rec.phases(stale.id) == [Phase.ENQUEUED, Phase.EXPIRED]


async def test_canvas_members_and_enqueue_many_are_announced(rt: Runtime, rec: Recorder
                                                           ) -> None:
    @rt.task
    async def one(x: int) -> int:
        return x

    with anyio.fail_after(LIMIT):
        async with rt:
            handles = await rt.enqueue_many([one.s(1), one.s(2)])
            await rt.enqueue(group(one.s(3), one.s(4)))
    enqueued = [t.id for t in rec.seen if t.phase is Phase.ENQUEUED]
    assert [h.id for h in handles] == enqueued[:2]
    assert len(enqueued) == 4 and len(set(enqueued)) == 4


class DeferOnce:
    """Defers its task's first call by ``delay`` s; records admits and dones."""

    def __init__(self, task: str, delay: float = 0.3, raises: bool = False) -> None:
        self.task, self.delay, self.raises = task, delay, raises
        self.asked: list[str] = []
        self.done_calls: list[str] = []
        self.serving = False

    async def admit(self, message: TaskMessage, /) -> float | None:
        self.asked.append(message.id)
        if message.task == self.task and self.asked.count(message.id) == 1:
            if self.raises:
                raise ConnectionError("limit store down")
            return self.delay
        return None

    async def done(self, message: TaskMessage, /) -> None:
        self.done_calls.append(message.id)

    async def serve(self) -> None:
        self.serving = True
        await anyio.sleep_forever()


@pytest.mark.parametrize("raises", [False, True], ids=["delay", "gate-error"])
async def test_gate_defers_then_admits(rt: Runtime, raises: bool) -> None:
    ran: list[tuple[str, float]] = []

    @rt.task
    async def gated() -> str:
        ran.append(("gated", time.monotonic()))
        return "late"

    @rt.task
    async def free(i: int) -> int:
        ran.append((f"free{i}", time.monotonic()))
        return i

    gate = DeferOnce(gated.name, raises=raises)
    rt.gates.append(gate)
    rec = Recorder()
    rt.listeners.append(rec)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=2) as worker:
            assert gate.serving
            t0 = time.monotonic()
            slow = await rt.enqueue(gated.s())
            frees = [await rt.enqueue(free.s(i)) for i in range(5)]
            assert [await h for h in frees] == list(range(5))
            assert await slow == "late"
            await worker.idle()
            assert worker.deferred == 1
    assert [name for name, _ in ran].count("gated") == 1
    gated_at = next(at for name, at in ran if name == "gated")
    # the deferral's delay (0.3 s, or 1-2 s after a gate error) is a lower bound
    assert gated_at - t0 >= (1.0 if raises else 0.3)
    assert max(at for name, at in ran if name != "gated") < gated_at
    # done() once per admitted task, never for the deferral
    assert sorted(gate.done_calls) == sorted([slow.id, *(h.id for h in frees)])
    assert rec.phases(slow.id) == [Phase.ENQUEUED, Phase.SCHEDULED, Phase.STARTED,
                                   Phase.SUCCEEDED]
    info = await _info(rt, slow.id)
    assert (info.state, info.attempt) == (State.SUCCESS, 1)


async def _info(rt: Runtime, task_id: str) -> Any:
    async with rt:
        return await rt.handle(task_id).info()


async def test_worker_inspection(rt: Runtime) -> None:
    go = anyio.Event()
    inside = anyio.Event()

    @rt.task
    async def waits() -> None:
        inside.set()
        await go.wait()

    with anyio.fail_after(LIMIT):
        async with rt:
            w_cm = rt.worker()
            async with w_cm as worker:
                assert worker.state == "running"
                handle = await rt.enqueue(waits.s())
                await inside.wait()
                name, at = worker.running[handle.id]
                assert name == waits.name and abs(at - time.time() * 1000) < 60_000
                with pytest.raises(TypeError):
                    worker.running[handle.id] = ("x", 0)  # type: ignore[index]
                go.set()
                await handle
                await worker.idle()
                assert dict(worker.running) == {}
                assert (worker.processed, worker.failed, worker.deferred) == (1, 0, 0)
                worker.stop()
                assert worker.state == "draining"
            assert worker.state == "stopped"
