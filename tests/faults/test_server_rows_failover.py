"""RELIABILITY.md row C6, a primary/replica failover, on two redis-servers the
test starts itself (the replica follows the primary through a TCP proxy the test
owns, so that it can hold replication back).

1. A worker on the primary runs a first batch; the replica has it all.
2. Replication stalls (the proxy blackholes the replica's link), the worker is
   gone, and the producer enqueues a second batch.
3. The primary is SIGSTOPped, the replica promoted (``REPLICAOF NO ONE``), and
   a new worker pointed at it drains the queue.

Without ``min_replicas`` every message of the second batch was confirmed by
the primary alone and is lost with it (Redis replication is asynchronous: the
documented, Sentinel-like window; here it is held open on purpose, so the count
is the whole batch). With ``min_replicas=1`` each publish ``WAIT``s for the
replica: those of the second batch raise ``PublishError`` after
``replica_timeout_ms`` instead of returning, and no confirmed message is lost.
Either way the new worker serves the promoted replica at once: no hang, no
NOGROUP loop (the consumer group was replicated with the stream).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis

from brokers.base import PublishError
from tests.faults.app import WORK, build
from tests.faults.harness import (
    RedisServer,
    WorkerPool,
    wait_for_ledger,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, LedgerWriter, check
from tests.faults.nemesis import TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(120)]

QUEUE = "default"
FIRST = 100
SECOND = 20


def in_sync(primary: redis.Redis, replica: redis.Redis) -> bool:
    link = replica.info("replication")
    if link.get("master_link_status") != "up":
        return False
    return int(primary.info("replication")["master_repl_offset"]) == int(
        link["slave_repl_offset"])


async def enqueue_once(rt: object, log: LedgerWriter, key: str) -> bool:
    """One try (no retry): ENQ_OK when it returns, ENQ_INDET when it raises."""
    log.write("ENQ_SENT", id=key)
    try:
        await rt.enqueue(rt.signature(WORK, key, 0.0), task_id=key)  # type: ignore[attr-defined]
    except PublishError as e:
        log.write("ENQ_INDET", id=key, err=str(e)[:300])
        return False
    log.write("ENQ_OK", id=key)
    return True


@pytest.mark.parametrize("min_replicas", [0, 1], ids=["no-wait", "wait"])
async def test_failover_to_a_lagging_replica(
    min_replicas: int, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica")
    primary.start()
    replica.start()
    link = TcpProxy(target_port=primary.port).start()
    p_raw = redis.Redis(port=primary.port)
    r_raw = redis.Redis(port=replica.port)
    log = ledger.writer("test")
    stopped = False
    try:
        r_raw.execute_command("REPLICAOF", "127.0.0.1", link.port)

        async def synced() -> bool:
            return in_sync(p_raw, r_raw)

        await wait_until(synced, timeout=30, what="the replica to sync")
        url = primary.url + (f"?min_replicas={min_replicas}&replica_timeout_ms=100"
                             if min_replicas else "")
        rt = build(url, results=primary.url, namespace=namespace)
        first = [f"c6-a-{i:03d}" for i in range(FIRST)]
        second = [f"c6-b-{i:03d}" for i in range(SECOND)]
        env = worker_env(broker=primary.url, results=primary.url, namespace=namespace,
                         ledger=ledger)
        async with rt:
            async with WorkerPool(env=env, log_dir=tmp_path / "old", ledger=log,
                                  count=1, concurrency=10) as old:
                for key in first:
                    assert await enqueue_once(rt, log, key)
                await wait_for_ledger(ledger, lambda v: set(first) <= v.done(), timeout=60,
                                      what="the first batch to run on the primary",
                                      describe=old.logs)
            await wait_until(synced, timeout=30, what="the replica to catch up")
            log.write("NEMESIS", what="replication stalls")
            link.set_mode("blackhole")
            confirmed = [key for key in second if await enqueue_once(rt, log, key)]
        log.write("NEMESIS", what="SIGSTOP the primary, promote the replica")
        os.kill(primary.pid, signal.SIGSTOP)
        stopped = True
        r_raw.execute_command("REPLICAOF", "NO", "ONE")
        env = worker_env(broker=replica.url, results=replica.url, namespace=namespace,
                         ledger=ledger)
        rt = build(replica.url, namespace=namespace)
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "new", ledger=log, count=1,
                                  concurrency=10) as new:
            # bounded: a worker stuck on the failover fails here instead of hanging
            await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=new.logs)
            logs = new.logs(10_000)
            assert new.pids and not new.exits, new.logs()
    finally:
        log.close()
        p_raw.close()
        r_raw.close()
        link.close()
        if stopped:
            os.kill(primary.pid, signal.SIGCONT)
        primary.close()
        replica.close()
    view: LedgerView = ledger.read()
    report = check(view)
    print(f"\n[C6 min_replicas={min_replicas}] {FIRST} replicated, {len(confirmed)} of "
          f"{SECOND} confirmed while replication stalled, "
          f"{len(report.indeterminate)} raised: lost={len(report.lost)}")
    assert "DATA LOSS" not in logs and "NOGROUP" not in logs, logs
    assert not report.unexpected, report.summary()
    assert set(first) <= view.done()
    if min_replicas:
        assert not report.lost, report.summary()
        assert confirmed == []
        assert report.indeterminate == set(second)
        errors = [r["err"] for r in view.by_kind["ENQ_INDET"]]
        assert len(errors) == SECOND
        for err in errors:
            assert "acknowledged by 0 of 1 replicas within 100 ms (min_replicas)" in err, err
    else:
        assert confirmed == second
        assert report.lost == set(second), report.summary()


async def test_min_replicas_covers_every_publish_path(
    ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """With a live replica, ``enqueue`` (now and delayed) and ``enqueue_many``
    return once it has the messages; with its link stalled, each raises."""
    primary = RedisServer(tmp_path / "primary")
    replica = RedisServer(tmp_path / "replica")
    primary.start()
    replica.start()
    link = TcpProxy(target_port=primary.port).start()
    p_raw = redis.Redis(port=primary.port)
    r_raw = redis.Redis(port=replica.port)
    try:
        r_raw.execute_command("REPLICAOF", "127.0.0.1", link.port)

        async def synced() -> bool:
            return in_sync(p_raw, r_raw)

        await wait_until(synced, timeout=30, what="the replica to sync")
        rt = build(f"{primary.url}?min_replicas=1&replica_timeout_ms=100", namespace=namespace)

        def sigs(prefix: str) -> list[Any]:
            return [rt.signature(WORK, f"{prefix}-{i}", 0.0) for i in range(5)]

        async with rt:
            await rt.enqueue(rt.signature(WORK, "now", 0.0))
            await rt.enqueue(rt.signature(WORK, "later", 0.0), countdown=60)
            await rt.enqueue_many(sigs("many"))
            await rt.enqueue_many([s.set(countdown=60) for s in sigs("many-later")])
            held = await rt.broker.stats(QUEUE)
            link.set_mode("blackhole")
            for call in (lambda: rt.enqueue(rt.signature(WORK, "now", 0.0)),
                         lambda: rt.enqueue(rt.signature(WORK, "later", 0.0), countdown=60),
                         lambda: rt.enqueue_many(sigs("many"))):
                with pytest.raises(PublishError, match="acknowledged by 0 of 1 replicas"):
                    await call()
            link.set_mode("pass")
        replicated = r_raw.execute_command("XLEN", rt.broker._queue(QUEUE).streams[0])  # type: ignore[attr-defined]
    finally:
        p_raw.close()
        r_raw.close()
        link.close()
        primary.close()
        replica.close()
    assert (held.ready, held.delayed) == (6, 6), held
    assert replicated >= 6
