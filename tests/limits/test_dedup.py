"""Deduplication and debounce: a burst of 1,000 enqueues yields exactly one run."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import anyio
import pytest

from runtime.app import Runtime
from runtime.messages import State, TaskMessage
from runtime.ops.limits import Limits, LimitsGate, RedisLimitStore, before_enqueue, store_for
from tests.conftest import REDIS_URL

BURST = 1000


def build(broker: str = "memory://", namespace: str = "") -> tuple[Runtime, list[str]]:
    rt = Runtime(broker=broker, namespace=namespace)
    ran: list[str] = []

    @rt.task(name="index")
    async def index(doc_id: str, n: int) -> int:
        ran.append(f"{doc_id}:{n}")
        return n

    @rt.task(name="reindex")
    async def reindex(doc_id: str, n: int) -> int:
        ran.append(f"{doc_id}:{n}")
        return n

    index.limits = Limits.of(unique_for=timedelta(minutes=5), unique_key="doc_id")  # type: ignore[attr-defined]
    reindex.limits = Limits.of(debounce=timedelta(seconds=0.5), debounce_key="doc_id")  # type: ignore[attr-defined]
    rt.gates.append(LimitsGate(rt))
    return rt, ran


def message(task: str, doc_id: str, n: int) -> TaskMessage:
    return TaskMessage(id=uuid.uuid4().hex, task=task, args=[doc_id, n])


async def settled(rt: Runtime, ids: list[str]) -> dict[State, int]:
    """Wait until every id has a terminal result; the count by state."""
    with anyio.fail_after(120):  # generous: 1,000 deliveries on a loaded 2-core machine
        while True:
            results = [await rt.results.get(i) for i in ids]
            if all(r is not None and r.state.terminal for r in results):
                counts: dict[State, int] = {}
                for r in results:
                    assert r is not None
                    counts[r.state] = counts.get(r.state, 0) + 1
                return counts
            await anyio.sleep(0.1)


async def test_a_unique_burst_runs_once() -> None:
    rt, ran = build()
    async with rt:
        first: list[str] = []
        dup: list[str] = []

        async def enqueue(n: int) -> None:
            m = message("index", "doc1", n)
            decision = await before_enqueue(rt, m)
            if decision.existing_id is None:
                first.append(m.id)
                await rt.publish([decision.message])
            else:
                dup.append(decision.existing_id)

        async with anyio.create_task_group() as tg:
            for n in range(BURST):
                tg.start_soon(enqueue, n)
        assert len(first) == 1 and dup == first * (BURST - 1)
        async with rt.worker():
            assert await settled(rt, first) == {State.SUCCESS: 1}
    assert len(ran) == 1


async def test_a_debounced_burst_runs_only_its_last_call() -> None:
    rt, ran = build()
    async with rt:
        ids = []
        for n in range(BURST):
            decision = await before_enqueue(rt, message("reindex", "doc1", n))
            assert decision.existing_id is None and decision.message.eta_ms is not None
            ids.append(decision.message.id)
            await rt.publish([decision.message])
        async with rt.worker():
            assert await settled(rt, ids) == {State.SUCCESS: 1, State.REVOKED: BURST - 1}
        last = await rt.results.get(ids[-1])
        assert last is not None and last.state is State.SUCCESS and last.value == BURST - 1
    assert ran == [f"doc1:{BURST - 1}"]


@pytest.fixture
async def redis_rt(namespace: str) -> AsyncIterator[Runtime]:
    rt, _ = build(REDIS_URL, namespace)
    yield rt
    store = store_for(rt)
    assert isinstance(store, RedisLimitStore)
    await store.purge()
    await store.aclose()


@pytest.mark.redis
async def test_a_unique_burst_claims_once_on_redis(redis_rt: Runtime) -> None:
    winners: list[str] = []
    seen: set[str | None] = set()

    async def claim(n: int) -> None:
        m = message("index", "doc1", n)
        decision = await before_enqueue(redis_rt, m)
        seen.add(decision.existing_id)
        if decision.existing_id is None:
            winners.append(m.id)

    async with anyio.create_task_group() as tg:
        for n in range(BURST):
            tg.start_soon(claim, n)
    assert len(winners) == 1
    assert seen == {None, winners[0]}
