"""The event stream's entries on Redis (wire 2): a writer's batch is one stream entry
whose events have ids ``<entry>:<k>``; a reader resumes in the middle of an entry;
the stream is trimmed by events, not entries; entries of wire 1 (one event each)
are still read, and an entry of a later wire is skipped with a warning naming it."""

from __future__ import annotations

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from runtime.lifecycle import Phase
from runtime.ops.events import STREAM_WIRE, EventRecord, Gap, RedisEventStream, TaskEvent
from tests.conftest import REDIS_URL
from tests.ops.conftest import purge_ops, redis_up, tr

pytestmark = pytest.mark.redis


async def _take(stream: RedisEventStream, n: int, since: str | None) -> list[EventRecord]:
    out: list[EventRecord] = []
    with anyio.fail_after(20):  # generous: a loaded 2-core machine
        async for rec in stream.events(since=since):
            out.append(rec)
            if len(out) == n:
                break
    return out


def _ids(recs: list[EventRecord]) -> list[str]:
    return [r.event.id for r in recs if isinstance(r.event, TaskEvent)]


@pytest.fixture
async def client(namespace: str) -> object:
    await redis_up()
    c = aioredis.Redis.from_url(REDIS_URL)
    yield c
    await c.aclose()
    await purge_ops(namespace)


async def test_a_batch_is_one_entry_and_a_reader_resumes_inside_it(
        client: aioredis.Redis, namespace: str) -> None:
    stream = RedisEventStream(REDIS_URL, namespace=namespace, max_len=1000)
    try:
        for i in range(6):
            stream.transition(tr(f"a{i}", Phase.ENQUEUED))
        await stream.flush()
        assert STREAM_WIRE == 2 and await client.xlen(stream.key) == 1
        got = await _take(stream, 6, "0")
        entry = got[0].id.partition(":")[0]
        assert [r.id for r in got] == [f"{entry}:{k}" for k in range(6)]
        assert _ids(got) == [f"a{i}" for i in range(6)]
        # resumed after the third event: the rest of that entry, then the next one
        stream.transition(tr("b0", Phase.ENQUEUED))
        await stream.flush()
        assert _ids(await _take(stream, 4, got[2].id)) == ["a3", "a4", "a5", "b0"]
        # resumed after the last event of an entry, or after the entry's id alone
        assert _ids(await _take(stream, 1, got[5].id)) == ["b0"]
        assert _ids(await _take(stream, 1, entry)) == ["b0"]
    finally:
        await stream.aclose()


async def test_the_stream_is_trimmed_by_events_not_entries(
        client: aioredis.Redis, namespace: str) -> None:
    stream = RedisEventStream(REDIS_URL, namespace=namespace, max_len=10)
    try:
        for batch in range(6):   # 6 entries of 4 events: 24 written, at least 10 kept
            for i in range(4):
                stream.transition(tr(f"t{batch}-{i}", Phase.ENQUEUED))
            await stream.flush()
        first = (await _take(stream, 1, "0"))[0]
        kept = _ids(await _take(stream, 12, "0"))
        assert kept == [f"t{b}-{i}" for b in (3, 4, 5) for i in range(4)]
        assert await client.xlen(stream.key) == 3
        # a reader whose place went with the trim gets a Gap first
        for i in range(12):
            stream.transition(tr(f"u{i}", Phase.ENQUEUED))
        await stream.flush()
        behind = await _take(stream, 2, first.id)
        assert isinstance(behind[0].event, Gap)
    finally:
        await stream.aclose()


async def test_wire_1_entries_are_read_and_a_later_wire_is_skipped_with_a_warning(
        client: aioredis.Redis, namespace: str) -> None:
    stream = RedisEventStream(REDIS_URL, namespace=namespace, max_len=1000)
    old = msgspec.json.encode(TaskEvent(id="old", task="t", queue="q",
                                        phase=Phase.ENQUEUED, at_ms=1))
    try:
        # an older writer's entry (wire 1), a later writer's entry, then this writer's
        await client.xadd(stream.key, {"e": old})
        await client.xadd(stream.key, {"v": "3", "n": "1", "b": old})
        stream.transition(tr("new", Phase.ENQUEUED))
        await stream.flush()
        with capture_logs() as logs:
            got = await _take(stream, 2, "0")
        assert _ids(got) == ["old", "new"]
        assert ":" not in got[0].id and got[1].id.endswith(":0")
        skipped = [e for e in logs if "stream wire" in e["event"]]
        assert skipped and skipped[0]["wire"] == "3" and skipped[0]["wire_read"] == 2
    finally:
        await stream.aclose()
