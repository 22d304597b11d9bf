"""The event stream, fed transitions directly: every phase as a typed event, a live
follower woken without polling, resuming after a disconnect without gaps, and a Gap
when the reader's place was trimmed."""

from __future__ import annotations

import anyio
import msgspec

from runtime.lifecycle import Phase
from runtime.ops.events import (
    EventRecord,
    Gap,
    MemoryEventStream,
    RedisEventStream,
    TaskEvent,
    TickEvent,
    WorkerEvent,
)
from tests.ops.conftest import new_events, tr


async def _take(stream: MemoryEventStream | RedisEventStream, n: int,
                since: str | None) -> list[EventRecord]:
    out: list[EventRecord] = []
    with anyio.fail_after(20):  # generous: a loaded 2-core machine
        async for rec in stream.events(since=since):
            out.append(rec)
            if len(out) == n:
                break
    return out


async def test_every_transition_is_an_event_in_order(kind: str, namespace: str) -> None:
    stream = new_events(kind, namespace)
    try:
        for i, phase in enumerate(Phase):
            stream.transition(tr(f"e{i}", phase, worker="w", error="x" * 2000))
        stream.publish(WorkerEvent(worker="w", what="online", at_ms=1))
        stream.publish(TickEvent(schedule="s", task_id="s:1", tick_ms=1, at_ms=1))
        if isinstance(stream, RedisEventStream):
            await stream.flush()
        got = await _take(stream, len(Phase) + 2, "0")
        tasks = [r.event for r in got if isinstance(r.event, TaskEvent)]
        assert [e.phase for e in tasks] == list(Phase)
        assert all(e.v == 1 and len(e.error) <= 500 for e in tasks)
        assert isinstance(got[-2].event, WorkerEvent) and isinstance(got[-1].event, TickEvent)
        wire = msgspec.json.decode(msgspec.json.encode(got[0].event))
        assert wire["kind"] == "task" and wire["v"] == 1
    finally:
        await stream.aclose()


async def test_a_follower_wakes_on_new_events_and_resumes_without_gaps(
        kind: str, namespace: str) -> None:
    stream = new_events(kind, namespace)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream.serve)
            first: list[EventRecord] = []

            async def follow() -> None:
                first.extend(await _take(stream, 5, None))

            async with anyio.create_task_group() as readers:
                readers.start_soon(follow)
                await anyio.sleep(0.3)  # the follower is blocked on the stream, not polling
                for i in range(20):
                    stream.transition(tr(f"f{i}", Phase.ENQUEUED))
            # the follower disconnected after 5; more happen while it is away
            for i in range(20, 30):
                stream.transition(tr(f"f{i}", Phase.ENQUEUED))
            rest = await _take(stream, 25, first[-1].id)
            tg.cancel_scope.cancel()
        ids = [r.event.id for r in first + rest if isinstance(r.event, TaskEvent)]
        assert ids == [f"f{i}" for i in range(30)]
    finally:
        await stream.aclose()


async def test_a_reader_behind_the_retention_gets_a_gap() -> None:
    stream = MemoryEventStream(max_len=10)
    for i in range(3):
        stream.transition(tr(f"g{i}", Phase.ENQUEUED))
    start = (await _take(stream, 1, "0"))[0].id
    for i in range(3, 30):
        stream.transition(tr(f"g{i}", Phase.ENQUEUED))
    got = await _take(stream, 11, start)
    assert isinstance(got[0].event, Gap)
    assert [r.event.id for r in got[1:] if isinstance(r.event, TaskEvent)] == [
        f"g{i}" for i in range(20, 30)]
