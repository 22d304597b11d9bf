"""The verbs against a real embedded worker (memory, and Redis broker + results on the
shared server under a unique namespace): the index and the events follow each task;
retry and replay run new attempts that succeed; purge and cancel by filter; pause and
resume. Each verb says what it did and does nothing the second time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from runtime import Runtime
from runtime.lifecycle import Phase
from runtime.ops.api import Operations
from runtime.ops.events import TaskEvent
from runtime.ops.verbs import RETRY_OF, NothingToRetry, retry_id
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up

LIMIT = 30.0  # generous: a loaded 2-core machine; the work itself takes milliseconds

BACKENDS = [pytest.param("memory", id="memory"),
            pytest.param("redis", id="redis", marks=pytest.mark.redis)]

broken = {"on": True}


@pytest.fixture(params=BACKENDS)
async def rt(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Runtime]:
    if request.param == "redis":
        await redis_up()
        runtime = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace)
    else:
        runtime = Runtime("memory://", namespace=namespace)

    @runtime.task(name="flaky", queue="q")
    async def flaky(x: int) -> int:
        if broken["on"]:
            raise ValueError(f"broken for {x}")
        return x * 2

    @runtime.task(name="ok", queue="q")
    async def ok(x: int) -> int:
        return x

    broken["on"] = True
    try:
        yield runtime
    finally:
        if request.param == "redis":
            async with runtime:
                await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
                await runtime.results.purge_namespace()  # type: ignore[attr-defined]
            await purge_ops(namespace)


async def _drain(rt: Runtime) -> None:
    with anyio.fail_after(LIMIT):
        async with rt.worker(queues=["q"]) as w:
            await w.idle()


async def _settled(ops: Operations, task_id: str, phase: Phase) -> None:
    with anyio.fail_after(LIMIT):  # the index is written in batches by its listener
        while (s := await ops.task(task_id)) is None or s.state is not phase:
            await anyio.sleep(0.02)


async def test_retry_runs_a_new_attempt_linked_to_the_failure(rt: Runtime) -> None:
    async with rt, Operations(rt) as ops:
        h = await rt.enqueue(rt.signature("flaky", 21))
        await _drain(rt)
        await _settled(ops, h.id, Phase.FAILED)
        failed = await ops.task(h.id)
        assert failed is not None and failed.error_type.endswith("ValueError")
        assert failed.queue == "q" and failed.name == "flaky" and failed.worker
        broken["on"] = False
        report = await ops.retry(h.id)
        assert report.retried and report.new_id == retry_id(h.id)
        await _drain(rt)
        assert await rt.handle(report.new_id).result(timeout=LIMIT) == 42
        await _settled(ops, report.new_id, Phase.SUCCEEDED)
        again = await ops.retry(h.id)  # idempotent: nothing sent
        assert not again.retried and again.new_id == report.new_id
        with pytest.raises(NothingToRetry, match="dead letter"):
            await ops.retry("never-existed", queue="q")
        seen: list[Phase] = []
        with anyio.fail_after(LIMIT):
            async for rec in ops.events(since="0"):
                if isinstance(rec.event, TaskEvent) and rec.event.id in (h.id, report.new_id):
                    seen.append(rec.event.phase)
                if seen[-1:] == [Phase.SUCCEEDED]:
                    break
        assert seen[0] is Phase.ENQUEUED and Phase.FAILED in seen
        assert seen[-2:] == [Phase.STARTED, Phase.SUCCEEDED]


async def test_replay_by_filter_with_a_dry_run_then_purge(rt: Runtime) -> None:
    async with rt, Operations(rt) as ops:
        handles = [await rt.enqueue(rt.signature("flaky", i)) for i in range(5)]
        await _drain(rt)
        assert (await ops.replay("q", reason="rejected", dry_run=True)).matched == 0
        dry = await ops.replay("q", reason="failed", name="flaky", dry_run=True)
        assert (dry.matched, dry.done, dry.dry_run) == (5, 0, True)
        assert len(await rt.broker.dead_letters("q")) == 5  # a dry run changes nothing
        broken["on"] = False
        done = await ops.replay("q", reason="failed", ids=[h.id for h in handles[:3]])
        assert (done.matched, done.done) == (3, 3)
        await _drain(rt)
        for i, h in enumerate(handles[:3]):
            assert await rt.handle(retry_id(h.id)).result(timeout=LIMIT) == i * 2
            info = await rt.handle(retry_id(h.id)).info()
            assert info is not None
        assert (await ops.replay("q", ids=[h.id for h in handles[:3]])).matched == 0
        purged = await ops.purge_dead("q", name="flaky")
        assert (purged.matched, purged.done) == (2, 2)
        assert await rt.broker.dead_letters("q") == []
        assert (await ops.purge_dead("q")).done == 0


async def test_cancel_every_pending_task_of_a_name(rt: Runtime) -> None:
    async with rt, Operations(rt) as ops:
        doomed = [await rt.enqueue(rt.signature("flaky", i)) for i in range(4)]
        kept = await rt.enqueue(rt.signature("ok", 7))
        await _settled(ops, doomed[-1].id, Phase.ENQUEUED)
        report = await ops.cancel(name="flaky")
        assert (report.matched, report.revoked) == (4, 4)
        assert (await ops.cancel([d.id for d in doomed])).revoked == 0  # idempotent
        await _drain(rt)
        assert await kept.result(timeout=LIMIT) == 7
        for d in doomed:
            await _settled(ops, d.id, Phase.REVOKED)
        with pytest.raises(Exception, match="ids, a task name or a queue"):
            await ops.cancel()


async def test_pause_and_resume_are_persisted_and_idempotent(rt: Runtime) -> None:
    async with rt, Operations(rt) as ops:
        assert await ops.pause("q") is True
        assert await ops.pause("q") is False
        assert await ops.paused() == {"q"}
        assert await ops.resume("q") is True
        assert await ops.resume("q") is False
        assert await ops.paused() == set()


async def test_a_task_listed_by_state_and_a_page_of_many(rt: Runtime) -> None:
    broken["on"] = False
    async with rt, Operations(rt) as ops:
        for i in range(30):
            await rt.enqueue(rt.signature("ok", i))
        await _drain(rt)
        with anyio.fail_after(LIMIT):
            while await ops.count("succeeded", queue="q") < 30:
                await anyio.sleep(0.02)
        ids: list[str] = []
        cursor = None
        while True:
            page = await ops.tasks(state="succeeded", name="ok", limit=7, cursor=cursor)
            ids += [s.id for s in page.items]
            if (cursor := page.next_cursor) is None:
                break
        assert len(ids) == len(set(ids)) == 30
        assert RETRY_OF  # the header name is public
