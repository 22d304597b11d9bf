"""The task index's stored layout (version 2 on Redis: one summary string per task,
one sorted set per state, counts per queue and task name in a hash): counts by
queue and by name agree with the listing after moves and retention, awkward ids,
queues, names and workers (quotes, backslashes, spaces, newlines, non-ASCII) come
back as written, and a summary of another layout is skipped with a warning that
names the layout."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from runtime.lifecycle import Phase
from runtime.ops.index import IndexSettings, MemoryIndex, Query, RedisIndex
from runtime.ops.index.redis import LAYOUT, summary_key
from tests.conftest import REDIS_URL
from tests.ops.conftest import new_index, purge_ops, redis_up, tr


async def _feed(index: MemoryIndex | RedisIndex, *ts: object) -> None:
    for t in ts:
        index.transition(t)  # type: ignore[arg-type]
    await index.flush()


async def _listed(index: MemoryIndex | RedisIndex, phase: Phase, *, queue: str | None = None,
                  name: str | None = None) -> list[str]:
    page = await index.query(Query(states=(phase,), queue=queue, name=name, limit=10_000))
    return [s.id for s in page.items]


async def test_counts_by_queue_and_name_match_the_listing(kind: str, namespace: str) -> None:
    settings = IndexSettings(max_per_state=40, max_age_s=3600)
    index = new_index(kind, namespace, settings)
    now = int(time.time() * 1000)
    try:
        # 100 tasks enqueued, then 70 of them end (moves), 5 too old to keep (age),
        # and more than 40 per state (count): every count must follow
        await _feed(index, *[tr(f"c{i}", Phase.ENQUEUED, at_ms=now + i, queue=f"q{i % 3}",
                                task=f"t{i % 4}") for i in range(100)])
        await _feed(index, *[tr(f"c{i}", Phase.FAILED if i % 7 == 0 else Phase.SUCCEEDED,
                                at_ms=now + 1000 + i, queue=f"q{i % 3}", task=f"t{i % 4}")
                             for i in range(70)],
                    *[tr(f"old{i}", Phase.FAILED, at_ms=now - 7_200_000, queue="q0",
                         task="t0") for i in range(5)])
        for phase in (Phase.ENQUEUED, Phase.SUCCEEDED, Phase.FAILED, Phase.STARTED):
            total = await _listed(index, phase)
            assert await index.count(phase) == len(total)
            for q in ("q0", "q1", "q2"):
                assert await index.count(phase, queue=q) == len(
                    await _listed(index, phase, queue=q)), (phase, q)
            for t in ("t0", "t1", "t2", "t3"):
                assert await index.count(phase, name=t) == len(
                    await _listed(index, phase, name=t)), (phase, t)
            assert await index.count(phase, queue="q1", name="t2") == len(
                await _listed(index, phase, queue="q1", name="t2"))
        assert await index.count(Phase.ENQUEUED) == 30
        assert await index.count(Phase.SUCCEEDED) == 40   # 60 ended there, 40 kept
        assert await index.count(Phase.FAILED) == 10       # the 5 old ones aged out
        assert await index.count(Phase.FAILED, queue="nope") == 0
    finally:
        await index.aclose()


AWKWARD = [
    ('quote"id', 'q"1', 'name\\x', 'w "one"'),
    ("sp ace", "q 2", "näme ✓", "w\nnewline"),
    ("plain", "q3", "t.add", "host-1 2"),
]


@pytest.mark.parametrize(("task_id", "queue", "name", "worker"), AWKWARD)
async def test_awkward_ids_queues_names_and_workers_come_back(
        kind: str, namespace: str, task_id: str, queue: str, name: str, worker: str) -> None:
    index = new_index(kind, namespace)
    try:
        await _feed(index, tr(task_id, Phase.ENQUEUED, queue=queue, task=name))
        await _feed(index, tr(task_id, Phase.STARTED, queue=queue, task=name, worker=worker),
                    tr(task_id, Phase.FAILED, queue=queue, task=name, error='bad "x"\n\\',
                       error_type="E"))
        s = await index.get(task_id)
        assert s is not None
        expected_worker = worker.replace("\n", " ") if kind == "redis" else worker
        assert (s.id, s.queue, s.name, s.state, s.worker) == (
            task_id, queue, name, Phase.FAILED, expected_worker)
        assert s.error == 'bad "x"\n\\' and s.enqueued_ms and s.started_ms and s.finished_ms
        assert await index.count(Phase.FAILED, queue=queue) == 1
        assert await index.count(Phase.FAILED, name=name) == 1
        assert await index.count(Phase.ENQUEUED, queue=queue) == 0
        assert await _listed(index, Phase.FAILED, queue=queue) == [task_id]
    finally:
        await index.aclose()


@pytest.mark.redis
async def test_a_summary_of_another_layout_is_skipped_with_a_warning(namespace: str) -> None:
    await redis_up()
    index = RedisIndex(REDIS_URL, namespace=namespace)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await _feed(index, tr("a", Phase.FAILED), tr("b", Phase.FAILED))
        assert LAYOUT == 2 and summary_key(index.prefix, "a").endswith(":t2:a")
        raw = await client.get(summary_key(index.prefix, "b"))
        assert raw is not None and raw.startswith(b"v2 ")
        # a later layout wrote "b": this reader neither guesses nor fails
        await client.set(summary_key(index.prefix, "b"), b"v3 " + raw[3:])
        with capture_logs() as logs:
            assert await index.get("b") is None
            assert [s.id for s in (await index.query(Query())).items] == ["a"]
        warned = [e for e in logs if "layout 2" in e["event"]]
        assert warned and warned[0]["first_word"] == "v3"
        # layout 1's keys (ix:<state> sets, t:<id> hashes) are not this layout's
        assert await client.exists(index.prefix + "ix:failed", index.prefix + "t:a") == 0
    finally:
        await index.aclose()
        await client.aclose()
        await purge_ops(namespace)


@pytest.mark.redis
async def test_keys_of_the_older_layout_are_reported_once(namespace: str) -> None:
    """Workers not upgraded keep writing layout 1 (``ix:<state>`` sets) where this
    reader never looks: its empty listing warns, once, naming the keys."""
    await redis_up()
    index = RedisIndex(REDIS_URL, namespace=namespace)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        with capture_logs() as logs:  # nothing of layout 1: an empty listing, no warning
            assert (await index.query(Query(states=(Phase.FAILED,)))).items == []
        assert not [e for e in logs if "older layout" in e["event"]]
        await index.aclose()
        index = RedisIndex(REDIS_URL, namespace=namespace)  # a new reader checks again
        await client.zadd(index.prefix + "ix:failed", {"old-worker-task": 1})
        with capture_logs() as logs:
            assert (await index.query(Query(states=(Phase.FAILED,)))).items == []
            assert (await index.query(Query(states=(Phase.FAILED,)))).items == []
        warned = [e for e in logs if "older layout" in e["event"]]
        assert len(warned) == 1, logs
        assert warned[0]["keys"] == [index.prefix + "ix:failed"]
        assert "upgrade every worker and reader together" in warned[0]["event"]
    finally:
        await index.aclose()
        await client.aclose()
        await purge_ops(namespace)
