"""The one Redis writer of the task index and the event stream (runtime/ops/writer.py):
``listeners_for`` on Redis gives a single listener, and one flush puts every
transition in the index AND in the stream, in the order heard, other events
(worker, tick) between them; a task's steps written in one batch keep their
times; long errors are cut to the same length in both."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from runtime import Runtime
from runtime.lifecycle import Phase
from runtime.ops.api import Operations, events_of, listeners_for
from runtime.ops.events import EventRecord, TaskEvent, WorkerEvent
from runtime.ops.writer import RedisWriter
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up, tr

pytestmark = pytest.mark.redis


async def _take(ops: Operations, n: int, *, tasks_only: bool = False) -> list[EventRecord]:
    out: list[EventRecord] = []
    with anyio.fail_after(20):  # generous: a loaded 2-core machine
        async for rec in ops.events(since="0"):
            if tasks_only and not isinstance(rec.event, TaskEvent):
                continue
            out.append(rec)
            if len(out) == n:
                break
    return out


async def test_one_writer_fills_the_index_and_the_stream_in_one_flush(namespace: str) -> None:
    await redis_up()
    rt = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace, index=False, events=False)
    listeners = listeners_for(rt)
    assert len(listeners) == 1 and isinstance(listeners[0], RedisWriter)
    writer = listeners[0]
    stream = events_of(rt)
    assert stream is not None
    try:
        writer.transition(tr("a", Phase.ENQUEUED))
        writer.transition(tr("a", Phase.STARTED, worker="w1"))
        stream.publish(WorkerEvent(worker="w1", what="online", at_ms=1))
        # a long error (the event built in full, eta_ms given) and one without an eta
        writer.transition(tr("a", Phase.RETRYING, worker="w1", error_type="E", error="x" * 2000,
                             eta_ms=4_000_000_000_000))
        writer.transition(tr("b", Phase.DEAD_LETTERED, error="y" * 900, reason="bad_result"))
        await writer.flush()
        async with Operations(rt) as ops:
            a = await ops.task("a")
            assert a is not None and a.state is Phase.RETRYING and a.worker == "w1"
            assert a.enqueued_ms and a.started_ms and a.eta_ms == 4_000_000_000_000
            assert a.error == "x" * 500 and a.error_type == "E"
            b = await ops.task("b")
            assert b is not None and b.state is Phase.DEAD_LETTERED and b.eta_ms is None
            assert b.error == "y" * 500 and b.reason == "bad_result" and b.finished_ms
            assert await ops.count(Phase.ENQUEUED) == 0 and await ops.count(Phase.STARTED) == 0
            got = await _take(ops, 5)
        kinds = [(r.event.id, r.event.phase) if isinstance(r.event, TaskEvent)
                 else type(r.event).__name__ for r in got]
        assert kinds == [("a", Phase.ENQUEUED), ("a", Phase.STARTED), "WorkerEvent",
                         ("a", Phase.RETRYING), ("b", Phase.DEAD_LETTERED)]
        assert all(len(r.event.error) == 500 for r in got[3:] if isinstance(r.event, TaskEvent))
    finally:
        await writer.aclose()
        await purge_ops(namespace)


async def test_the_writer_serves_batches_while_the_runtime_is_open(namespace: str) -> None:
    await redis_up()
    rt = Runtime(REDIS_URL, results=REDIS_URL, namespace=namespace)

    @rt.task(name="noop", queue="ixw")
    async def noop(i: int) -> int:
        return i

    try:
        async with rt:
            await rt.enqueue_many([noop.s(i) for i in range(300)])
            async with rt.worker(queues=["ixw"], concurrency=20) as w:
                await w.idle()
            async with Operations(rt) as ops:
                with anyio.fail_after(30):  # written by the listener's serve, not a flush
                    while await ops.count(Phase.SUCCEEDED, queue="ixw") < 300:
                        await anyio.sleep(0.05)
                assert await ops.count(Phase.SUCCEEDED, name="noop") == 300
                phases = [r.event.phase for r in await _take(ops, 900, tasks_only=True)
                          if isinstance(r.event, TaskEvent)]
                assert Counter(phases) == {Phase.ENQUEUED: 300, Phase.STARTED: 300,
                                           Phase.SUCCEEDED: 300}
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]
    finally:
        await purge_ops(namespace)
