"""A 10,000-member chord on every broker: the body runs once, with every result
in header order, and the join's keys in a Redis result store expire."""

from __future__ import annotations

import collections
import time

import anyio
import pytest
import redis.asyncio as aioredis
import structlog

from runtime import Runtime, chord
from runtime.results.redis import RedisResultStore
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

log = structlog.get_logger(__name__)

MEMBERS = 10_000
#: A liveness bound, not a speed claim: it catches a hang or a lost member, never a
#: slow run. Alone on this 2-core machine the chord takes well under a minute per
#: broker, but CI shares the machine with CPU-bound work; 8 minutes leaves a wide
#: margin. (Throughput is measured by the benchmarks, not asserted here.)
BIG_LIMIT = 480.0


async def _ttls(namespace: str) -> dict[str, list[int]]:
    """PTTL (ms) of every result-store key of the namespace, by kind of key."""
    client = aioredis.Redis.from_url(REDIS_URL)
    found: dict[str, list[int]] = collections.defaultdict(list)
    try:
        for kind in ("join", "result", "claim"):
            keys = [key async for key in client.scan_iter(match=f"{namespace}:{kind}:*", count=1000)]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.pttl(key)
            found[kind] = list(await pipe.execute()) if keys else []
    finally:
        await client.aclose()
    return found


@pytest.mark.timeout(BIG_LIMIT + 60)  # above BIG_LIMIT, so fail_after reports it first
async def test_a_10000_member_chord_runs_its_body_once(rt: Runtime, kind: str,
                                                       namespace: str) -> None:
    runs: collections.Counter[str] = collections.Counter()
    bodies: list[list[int]] = []

    @rt.task(name="member")
    async def member(i: int) -> int:
        runs["member"] += 1
        return i * 3

    @rt.task(name="body")
    async def body(values: list[int]) -> int:
        runs["body"] += 1
        bodies.append(values)
        return len(values)

    started = time.monotonic()
    with anyio.fail_after(BIG_LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(chord((member.s(i) for i in range(MEMBERS)), body.s()))
            enqueued = time.monotonic()
            assert await handle.result(timeout=BIG_LIMIT) == MEMBERS
            await worker.idle()
            ttls = await _ttls(namespace) if isinstance(rt.results, RedisResultStore) else None
    log.info("10000-member chord done", broker=kind, enqueue_s=round(enqueued - started, 2),
             total_s=round(time.monotonic() - started, 2))
    assert runs["body"] == 1
    assert bodies == [[i * 3 for i in range(MEMBERS)]]
    assert runs["member"] >= MEMBERS  # at least once each (a redelivery may repeat one)
    if ttls is not None:
        assert len(ttls["join"]) == 1, ttls["join"]
        assert ttls["join"][0] > 0  # the join hash expires (PTTL -1 would mean never)
        assert len(ttls["result"]) >= MEMBERS + 1
        assert all(ttl > 0 for ttl in ttls["result"])
        assert ttls["claim"] and all(ttl > 0 for ttl in ttls["claim"])
