"""The task index, fed transitions directly (no worker): each state, moves between
states, out-of-order reports, filters, cursor pagination under concurrent writes,
retention by count and age, and the cost per transition."""

from __future__ import annotations

import time

import anyio
import pytest

from runtime.lifecycle import Phase
from runtime.ops.index import IndexSettings, MemoryIndex, Query, RedisIndex
from tests.ops.conftest import new_index, tr


async def _feed(index: MemoryIndex | RedisIndex, *ts: object) -> None:
    for t in ts:
        index.transition(t)  # type: ignore[arg-type]
    await index.flush()


async def test_every_state_is_listed_with_its_summary(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace)
    try:
        for phase in Phase:
            await _feed(index, tr(f"id-{phase.value}", phase, worker="w1", error_type="E",
                                  error="boom", reason="failed" if phase.final else ""))
        for phase in Phase:
            page = await index.query(Query(states=(phase,)))
            assert [s.id for s in page.items] == [f"id-{phase.value}"]
            s = page.items[0]
            assert (s.state, s.queue, s.name, s.worker) == (phase, "q", "t.add", "w1")
            assert s.error_type == "E" and s.error == "boom"
            assert (s.finished_ms is not None) == phase.final
            assert await index.count(phase) == 1
    finally:
        await index.aclose()


async def test_a_task_moves_between_states_and_keeps_its_times(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace)
    try:
        await _feed(index, tr("a", Phase.ENQUEUED, at_ms=1_000_000 + int(time.time() * 1000)))
        enq = await index.get("a")
        assert enq is not None and enq.state is Phase.ENQUEUED
        await _feed(index, tr("a", Phase.STARTED, worker="w1"),
                    tr("a", Phase.RETRYING, worker="w1", error_type="ValueError"),
                    tr("a", Phase.STARTED, attempt=2, worker="w2"),
                    tr("a", Phase.SUCCEEDED, attempt=2, worker="w2"))
        s = await index.get("a")
        assert s is not None
        assert (s.state, s.attempt, s.worker) == (Phase.SUCCEEDED, 2, "w2")
        assert s.enqueued_ms == enq.enqueued_ms and s.started_ms and s.finished_ms
        for phase in (Phase.ENQUEUED, Phase.STARTED, Phase.RETRYING):
            assert await index.count(phase) == 0
            assert await index.count(phase, queue="q") == 0
            assert await index.count(phase, name="t.add") == 0
        assert await index.count(Phase.SUCCEEDED, queue="q") == 1
    finally:
        await index.aclose()


async def test_an_earlier_step_reported_late_never_wins(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace)
    try:
        # a fast worker's STARTED and SUCCEEDED land before the client's ENQUEUED
        await _feed(index, tr("b", Phase.STARTED), tr("b", Phase.SUCCEEDED),
                    tr("b", Phase.ENQUEUED), tr("b", Phase.STARTED))
        s = await index.get("b")
        assert s is not None and s.state is Phase.SUCCEEDED
        assert await index.count(Phase.ENQUEUED) == 0
    finally:
        await index.aclose()


async def test_filters_by_queue_name_and_time(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace)
    base = int(time.time() * 1000)
    try:
        await _feed(index, *[tr(f"x{i}", Phase.FAILED, at_ms=base + i, queue=f"q{i % 2}",
                                task=f"t{i % 3}") for i in range(30)])
        q0 = await index.query(Query(states=(Phase.FAILED,), queue="q0", limit=100))
        assert {s.id for s in q0.items} == {f"x{i}" for i in range(0, 30, 2)}
        t1 = await index.query(Query(name="t1", limit=100))
        assert {s.id for s in t1.items} == {f"x{i}" for i in range(1, 30, 3)}
        both = await index.query(Query(queue="q1", name="t1", limit=100))
        assert {s.id for s in both.items} == {f"x{i}" for i in range(30) if i % 6 == 1}
        window = await index.query(Query(since_ms=base + 10, until_ms=base + 19, limit=100))
        assert [s.id for s in window.items] == [f"x{i}" for i in range(19, 9, -1)]
    finally:
        await index.aclose()


async def test_pages_are_stable_under_concurrent_writes(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace)
    base = int(time.time() * 1000)
    try:
        # ties on purpose: five tasks share each millisecond
        await _feed(index, *[tr(f"p{i:03}", Phase.ENQUEUED, at_ms=base + i // 5)
                             for i in range(250)])
        seen: list[str] = []
        cursor = None
        extra = 0
        while True:
            page = await index.query(Query(states=(Phase.ENQUEUED,), limit=40, cursor=cursor))
            seen += [s.id for s in page.items]
            # meanwhile: new tasks arrive (newer) and some listed ones start
            await _feed(index, *[tr(f"n{extra + j}", Phase.ENQUEUED, at_ms=base + 10_000 + extra + j)
                                 for j in range(7)],
                        tr(seen[-1], Phase.STARTED) if seen else tr("zz", Phase.ENQUEUED))
            extra += 7
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), "a task was listed twice"
        assert set(seen) == {f"p{i:03}" for i in range(250)}, "a task was skipped"
    finally:
        await index.aclose()


async def test_retention_bounds_the_index_under_100k_transitions(kind: str,
                                                                 namespace: str) -> None:
    settings = IndexSettings(max_per_state=1_000, batch=512)
    index = new_index(kind, namespace, settings)
    n = 100_000
    try:
        ts = []
        for i in range(n // 2):
            ts.append(tr(f"r{i}", Phase.ENQUEUED, queue=f"q{i % 4}", task=f"t{i % 8}"))
            ts.append(tr(f"r{i}", Phase.SUCCEEDED if i % 10 else Phase.FAILED,
                         queue=f"q{i % 4}", task=f"t{i % 8}"))
        start = time.perf_counter()
        with anyio.fail_after(300):  # a bound for a loaded 2-core machine, not a target
            for t in ts:
                index.transition(t)
            await index.flush()
        took = time.perf_counter() - start
        print(f"\n[index/{kind}] {n} transitions in {took:.2f}s: "
              f"{took / n * 1e6:.1f} us per transition (batched)")
        for phase in Phase:
            assert await index.count(phase) <= settings.max_per_state
            for q in range(4):
                assert await index.count(phase, queue=f"q{q}") <= settings.max_per_state
        assert await index.count(Phase.SUCCEEDED) == settings.max_per_state
        assert await index.count(Phase.FAILED) == settings.max_per_state
        assert await index.count(Phase.ENQUEUED) == 0
        assert await index.get("r0") is None  # trimmed: summary gone too
        newest = (await index.query(Query(states=(Phase.SUCCEEDED,), limit=1))).items[0]
        assert newest.id == f"r{n // 2 - 1}"
        if isinstance(index, RedisIndex):  # the summaries are bounded as well
            keys = [k async for k in index._redis.scan_iter(match=index.prefix + "t2:*",
                                                            count=5000)]
            assert len(keys) <= settings.max_per_state * 2
    finally:
        await index.aclose()


async def test_old_tasks_age_out(kind: str, namespace: str) -> None:
    index = new_index(kind, namespace, IndexSettings(max_age_s=60))
    now = int(time.time() * 1000)
    try:
        await _feed(index, tr("old", Phase.FAILED, at_ms=now - 3_600_000),
                    tr("new", Phase.FAILED, at_ms=now))
        assert [s.id for s in (await index.query(Query())).items] == ["new"]
        assert await index.get("old") is None
    finally:
        await index.aclose()


@pytest.mark.parametrize("limit", [0, -1])
async def test_a_bad_cursor_says_what_to_do(limit: int) -> None:
    from runtime.errors import ConfigError

    index = MemoryIndex()
    with pytest.raises(ConfigError, match="next_cursor"):
        await index.query(Query(cursor="garbage"))
    with pytest.raises(ConfigError):
        IndexSettings(max_per_state=limit)
