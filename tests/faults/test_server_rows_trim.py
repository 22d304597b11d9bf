"""RELIABILITY.md row C5, stream trimming vs a backlog, on a redis-server each
test starts itself, with real worker processes and the ledger.

What the Redis broker does: it has **no trim policy and no cap**. A queue's
stream holds exactly the messages not yet settled (each is ``XDEL``'d when it
is acked, requeued or dead-lettered), so it is never trimmed by length and a
pending entry is never deleted under its consumer. A backlog is bounded by
Redis's memory (row C7: under ``noeviction`` enqueue then raises).

- positive: a backlog of 20,000 published in one batch before any worker runs
  is all in the stream, and all of it runs; lost = 0.
- negative: someone else trims the stream (``XADD … MAXLEN ~ 1000``) while a
  killed worker's entries are pending: the ledger counts every trimmed message
  as lost, and the worker that reclaims the pending ones logs a DATA LOSS error
  naming each deleted entry id (the deleted-id list ``XAUTOCLAIM`` returns).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from brokers.redis.keys import decode
from runtime.app import Runtime
from tests.faults.app import WORK, build
from tests.faults.harness import (
    RedisServer,
    WorkerPool,
    describe,
    wait_for_ledger,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, LedgerWriter, check

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(150)]

QUEUE = "default"
BATCH = 1000


@contextmanager
def rig(server: RedisServer, ledger: Ledger, namespace: str
        ) -> Iterator[tuple[Runtime, dict[str, str], LedgerWriter]]:
    url = f"{server.url}?lease_s=1"
    rt = build(url, results=server.url, namespace=namespace)
    env = worker_env(broker=url, results=server.url, namespace=namespace, ledger=ledger)
    log = ledger.writer("test")
    try:
        yield rt, env, log
    finally:
        log.close()


async def enqueue_batches(rt: Runtime, log: LedgerWriter, keys: list[str],
                          sleep_s: dict[str, float]) -> None:
    """``enqueue_many`` in batches of 1,000, with ledger records around each batch
    (it raises or confirms the whole batch)."""
    for i in range(0, len(keys), BATCH):
        chunk = keys[i:i + BATCH]
        for key in chunk:
            log.write("ENQ_SENT", id=key)
        handles = await rt.enqueue_many(
            [rt.signature(WORK, key, sleep_s.get(key, 0.0)) for key in chunk], task_ids=chunk)
        assert not any(h.duplicate for h in handles)
        for key in chunk:
            log.write("ENQ_OK", id=key)


def all_done(view: LedgerView) -> bool:
    return bool(view.ids("ENQ_OK")) and view.ids("ENQ_OK") <= view.done()


def stream_ids(client: redis.Redis, stream: str) -> dict[bytes, str]:
    """entry id -> task id of every task entry of ``stream``."""
    entries = client.xrange(stream)
    return {entry_id: decode(fields[b"e"]).id for entry_id, fields in entries if b"e" in fields}


async def test_a_backlog_above_any_cap_is_never_trimmed_and_all_runs(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    backlog = 20_000
    keys = [f"c5p-{i:05d}" for i in range(backlog)]
    client = redis.Redis(port=redis_server.port)
    with rig(redis_server, ledger, namespace) as (rt, env, log):
        async with rt:
            stream = rt.broker._queue(QUEUE).streams[0]  # type: ignore[attr-defined]
            await enqueue_batches(rt, log, keys, {})
            assert client.xlen(stream) == backlog  # all queued, nothing trimmed
            async with WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                                  concurrency=50) as pool:
                # 20,000 tasks on one shared core: generous
                await wait_for_ledger(ledger, all_done, timeout=120,
                                      what="the whole backlog to end ok",
                                      describe=describe(pool.logs,
                                                        lambda: check(ledger.read()).summary()))
                await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
            assert client.xlen(stream) == 0  # settled entries are deleted one by one
    client.close()
    report = check(ledger.read())
    assert report.enqueued == backlog
    print(f"\n[C5 backlog] {backlog} queued in one go, XLEN {backlog}: lost={len(report.lost)}")
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()


async def test_a_foreign_maxlen_trim_under_a_pending_backlog_is_reported_as_loss(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    backlog = 3_000
    keys = [f"c5n-{i:05d}" for i in range(backlog)]
    # the head of the queue sleeps long: the first worker is killed holding them
    held = {key: 60.0 for key in keys[:50]}
    client = redis.Redis(port=redis_server.port)
    with rig(redis_server, ledger, namespace) as (rt, env, log):
        async with rt:
            q = rt.broker._queue(QUEUE)  # type: ignore[attr-defined]
            stream = q.streams[0]
            await enqueue_batches(rt, log, keys, held)
            async with WorkerPool(env=env, log_dir=tmp_path / "first", ledger=log, count=1,
                                  concurrency=4) as first:
                [victim] = first.pids
                await wait_for_ledger(ledger, lambda v: len(v.open_starts(victim)) == 4,
                                      timeout=30, what="the first worker to run 4 tasks",
                                      describe=first.logs)
                first.kill(victim)
            pending = {entry[0] if isinstance(entry, list) else entry["message_id"]
                       for entry in client.xpending_range(stream, "taskloom", "-", "+", 1000)}
            assert pending, "the killed worker left entries pending"
            before = stream_ids(client, stream)
            # another program writes to the queue's stream with a length cap
            client.xadd(stream, {"x": "foreign"}, maxlen=1000, approximate=True)
            after = stream_ids(client, stream)
            trimmed = {before[i] for i in set(before) - set(after)}
            assert {before[i] for i in pending} <= trimmed, "the trim reached the pending entries"
            async with WorkerPool(env=env, log_dir=tmp_path / "second", ledger=log, count=1,
                                  concurrency=50) as second:
                lines: list[str] = []

                async def loss_logged() -> bool:
                    lines[:] = [line for line in second.logs(100_000).splitlines()
                                if "DATA LOSS: pending entries" in line]
                    return bool(lines)

                await wait_until(loss_logged, timeout=60, what="the reclaim's DATA LOSS line",
                                 describe=second.logs)
                await wait_queue_settled(rt, QUEUE, timeout=60, describe_more=second.logs)
            dead = await rt.broker.dead_letters(QUEUE)
    client.close()
    report = check(ledger.read())
    logged = "\n".join(lines)
    for entry_id in pending:
        assert entry_id.decode() in logged, (entry_id, logged)
    print(f"\n[C5 trim] {backlog} queued, {len(pending)} pending on the killed worker, "
          f"XADD MAXLEN ~ 1000 trimmed {len(trimmed)}: lost={len(report.lost)}, "
          f"{len(pending)} deleted ids logged")
    assert report.lost == trimmed, report.summary()
    assert not report.unexpected, report.summary()
    # the foreign entry is not a task: dead-lettered as such, not run
    assert [d.reason for d in dead] == ["malformed_entry"]
