"""The task index stays usable at 1,000,000 tasks: a million summaries written
through the index's own write path (``RedisIndex.transition`` + ``flush``, the
batches the worker's listener writes), then listing by state pages through
them correctly (order, no gaps, no repeats, counts), time windows and queue
filters land where they should, and the dashboard's ``GET /api/tasks`` answers
the same pages. No timing assertions; its keys are removed after.

Layout (``i`` = 0 .. 999,999; task ``i`` entered its state at ``BASE - i`` ms, so
lower ``i`` is newer): every 100th task is ENQUEUED (a state small enough to page
through whole), those with ``i % 10 in (1, 2, 3)`` FAILED, the rest SUCCEEDED;
queue ``q<i % 2>``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from runtime import Runtime
from runtime.dashboard import dashboard_app
from runtime.lifecycle import Phase, Transition
from runtime.ops.index import IndexSettings, Query, RedisIndex
from runtime.ops.index.redis import summary_key
from tests.conftest import REDIS_URL
from tests.dashboard.conftest import redis_up

pytestmark = [pytest.mark.redis, pytest.mark.slow]

N = 1_000_000
FLUSH_EVERY = 100_000   # below the writer's buffer bound, so nothing is dropped
BASE = int(time.time() * 1000) - 1000


def phase_of(i: int) -> Phase:
    r = i % 10
    return (Phase.ENQUEUED if i % 100 == 0 else Phase.FAILED if r in (1, 2, 3)
            else Phase.SUCCEEDED)


def tid(i: int) -> str:
    return f"m{i:07d}"


def expected(phase: Phase, queue: str | None = None, start: int = 0) -> Iterator[int]:
    """The task numbers of ``phase`` (and ``queue``) newest first, from ``start``."""
    for i in range(start, N):
        if phase_of(i) is phase and (queue is None or queue == f"q{i % 2}"):
            yield i


def first(it: Iterator[int], n: int) -> list[str]:
    out = []
    for i in it:
        out.append(tid(i))
        if len(out) == n:
            break
    return out


async def load(index: RedisIndex) -> None:
    add = index.transition
    enq, failed, ok = Phase.ENQUEUED, Phase.FAILED, Phase.SUCCEEDED
    for lo in range(0, N, FLUSH_EVERY):
        for i in range(lo, lo + FLUSH_EVERY):
            r = i % 10
            add(Transition(id=tid(i), task="tasks.add", queue=f"q{i % 2}",
                           phase=enq if i % 100 == 0 else failed if 0 < r < 4 else ok,
                           at_ms=BASE - i))
        await index.flush()


#: unlinks the summaries ``ARGV[1] .. %07d`` for a range of numbers inside Redis:
#: a million keys by name without sending a million names
_UNLINK_RANGE = """
local n = 0
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  n = n + redis.call('UNLINK', ARGV[1] .. string.format('%07d', i))
end
return n
"""


async def remove(index: RedisIndex, namespace: str) -> None:
    """The summaries by their known keys (no scan of a million), then whatever else
    carries the namespace (the sets)."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for lo in range(0, N, 50_000):
            await client.eval(_UNLINK_RANGE, 0, summary_key(index.prefix, "m"), lo, lo + 49_999)
        keys = [k async for k in client.scan_iter(match=f"*{namespace}*", count=50_000)]
        for lo in range(0, len(keys), 1000):
            await client.unlink(*keys[lo:lo + 1000])
    finally:
        await client.aclose()


async def test_a_million_tasks_list_by_state_in_pages(namespace: str) -> None:
    await redis_up()
    # keep them all (the point is the size), in chunks of 2048 per script call (the
    # default 512 makes the load twice as long on a 2-core machine)
    settings = IndexSettings(max_per_state=N, batch=2048)
    index = RedisIndex(REDIS_URL, namespace=namespace, settings=settings)
    try:
        await load(index)
        # counts per state and per state and queue
        assert await index.count(Phase.ENQUEUED) == N // 100
        assert await index.count(Phase.FAILED) == 3 * N // 10
        assert await index.count(Phase.SUCCEEDED) == N - N // 100 - 3 * N // 10
        assert await index.count(Phase.FAILED, queue="q1") == 2 * N // 10
        # every ENQUEUED task, page by page: newest first, none missed, none twice
        seen: list[str] = []
        cursor = None
        while True:
            page = await index.query(Query(states=(Phase.ENQUEUED,), limit=500, cursor=cursor))
            seen += [s.id for s in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == [tid(i) for i in range(0, N, 100)]
        # a page deep in the FAILED set, from a time window: exactly the tasks there
        middle = 654_321
        page = await index.query(Query(states=(Phase.FAILED,), until_ms=BASE - middle,
                                       limit=100))
        assert [s.id for s in page.items] == first(expected(Phase.FAILED, start=middle), 100)
        nxt = await index.query(Query(states=(Phase.FAILED,), until_ms=BASE - middle,
                                      limit=100, cursor=page.next_cursor))
        assert [s.id for s in nxt.items] == first(expected(Phase.FAILED, start=middle), 200)[100:]
        # two states at once, one queue: merged newest first
        both = await index.query(Query(states=(Phase.FAILED, Phase.SUCCEEDED), queue="q0",
                                       since_ms=BASE - 40, limit=50))
        assert [s.id for s in both.items] == [tid(i) for i in range(2, 41, 2)]
        assert both.next_cursor is None
        # the oldest page ends the listing
        tail = await index.query(Query(states=(Phase.SUCCEEDED,), until_ms=BASE - (N - 25),
                                       limit=50))
        assert [s.id for s in tail.items] == first(expected(Phase.SUCCEEDED, start=N - 25), 50)
        assert tail.next_cursor is None
        await dashboard_pages(namespace)
    finally:
        await index.aclose()
        await remove(index, namespace)


async def dashboard_pages(namespace: str) -> None:
    """``GET /api/tasks`` on the dashboard of a runtime on that namespace."""
    rt = Runtime(REDIS_URL, namespace=namespace)
    app = dashboard_app(rt)
    async with app.state.dashboard.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
            with anyio.fail_after(60):   # generous: a bound, not a timing assertion
                r = await client.get("/api/tasks?state=FAILURE&limit=500")
                assert r.status_code == 200, r.text
                body = r.json()
                assert [t["id"] for t in body["items"]] == first(expected(Phase.FAILED), 500)
                assert {t["state"] for t in body["items"]} == {"FAILURE"}
                r2 = await client.get("/api/tasks", params={"state": "FAILURE", "limit": 500,
                                                            "cursor": body["next_cursor"]})
                assert [t["id"] for t in r2.json()["items"]] == \
                    first(expected(Phase.FAILED), 1000)[500:]
                q = await client.get("/api/tasks?state=SUCCESS&queue=q1&limit=50")
                assert [t["id"] for t in q.json()["items"]] == \
                    first(expected(Phase.SUCCEEDED, "q1"), 50)
                ops = app.state.dashboard.source.ops
                assert await ops.count("succeeded", queue="q1") == 3 * N // 10
