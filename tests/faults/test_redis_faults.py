"""Fault tests on Redis Streams (RELIABILITY.md rows A1, C1, C4) against a
redis-server each test starts itself (AOF everysec), with real worker processes.

The result store is the same test-owned Redis (the runtime's default for a
redis:// broker), so a Redis crash also hits result writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from runtime.app import Runtime
from runtime.messages import State
from runtime.results.redis import RedisResultStore
from tests.faults.app import WORK, build
from tests.faults.harness import (
    Producer,
    RedisServer,
    WorkerPool,
    describe,
    results_of,
    tail,
    wait_for_ledger,
    wait_queue_settled,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, check

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(120)]

QUEUE = "default"


def broker_url(server: RedisServer, **options: object) -> str:
    return f"{server.url}?{urlencode(options)}" if options else server.url


def all_done(view: LedgerView) -> bool:
    return bool(view.ids("ENQ_OK")) and view.ids("ENQ_OK") <= view.done()


@contextmanager
def rig(server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path, *,
        lease_s: float) -> Iterator[tuple[Runtime, dict[str, str], Producer]]:
    """The producer runtime and the workers' environment. Results go to the same
    Redis, named explicitly: the broker URL carries broker options (lease_s) that
    the result store would hand to redis-py."""
    url = broker_url(server, lease_s=lease_s)
    rt = build(url, results=server.url, namespace=namespace)
    env = worker_env(broker=url, results=server.url, namespace=namespace, ledger=ledger)
    log = ledger.writer("test")
    try:
        yield rt, env, Producer(rt, log)
    finally:
        log.close()


async def test_sigkill_of_a_worker_mid_task_loses_no_task(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """A1: kill -9 one of two workers while it runs tasks; the other reclaims its
    unsettled deliveries after the lease and every task completes."""
    concurrency = 4
    with rig(redis_server, ledger, namespace, tmp_path, lease_s=2) as (rt, env, producer):
        keys = [f"a1-{i:03d}" for i in range(50)]
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=concurrency) as pool:
            victim, survivor = pool.pids
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.5)) for k in keys])
            await wait_for_ledger(ledger, lambda v: bool(v.open_starts(victim)), timeout=30,
                                  what=f"worker {victim} to be running a task",
                                  describe=pool.logs)
            pool.kill(victim)
            view = await wait_for_ledger(ledger, all_done, timeout=60,
                                         what="every enqueued task to end ok",
                                         describe=describe(pool.logs,
                                                           lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, keys, timeout=20)
            assert survivor in pool.pids, f"the surviving worker died:\n{pool.logs()}"

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert not report.concurrent_dup, report.summary()
    assert report.enqueued == len(keys)
    interrupted = {r["id"] for r in view.by_kind["START"] if r["pid"] == victim} - {
        r["id"] for r in view.by_kind["END"] if r["pid"] == victim}
    assert interrupted, "the victim was killed mid-task, so some task was interrupted"
    # what the victim held ran again (visible as a duplicate) and nothing else did
    assert interrupted <= set(report.dup_exec), report.summary()
    assert len(report.dup_exec) <= concurrency, report.summary()
    assert all(r.state is State.SUCCESS for r in results.values())
    for key in interrupted:
        assert results[key].delivery_count >= 2, (key, results[key])


async def test_redis_crash_and_restart_mid_load_loses_no_acknowledged_enqueue(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """C1: kill -9 redis-server while tasks are published and consumed, restart it
    on the same port and AOF (everysec): every ENQ_OK survives, the workers
    reconnect and finish everything."""
    concurrency = 4
    with rig(redis_server, ledger, namespace, tmp_path, lease_s=2) as (rt, env, producer):
        warmup = [f"c1-w{i}" for i in range(4)]
        keys: list[str] = []
        fault_over = anyio.Event()
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=concurrency) as pool:
            workers = set(pool.pids)
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.0)) for k in warmup])
            await wait_for_ledger(ledger, all_done, timeout=30,
                                  what="the warm-up tasks (a worker is consuming)",
                                  describe=pool.logs)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: producer.enqueue_through(
                    lambda i: (f"c1-{i:04d}", rt.signature(WORK, f"c1-{i:04d}", 0.02)),
                    fault_over, after=50, keys=keys))
                await producer.after(len(warmup) + 50).wait()
                producer.ledger.write("NEMESIS", what="kill -9 redis-server, restart after 1 s")
                await redis_server.arestart(kill=True, down_s=1.0)
                fault_over.set()
            await wait_for_ledger(ledger, all_done, timeout=60,
                                  what="every confirmed task to end ok after the restart",
                                  describe=describe(pool.logs, lambda: tail(redis_server.log),
                                                    lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
            # the producer's result store connected before the crash
            results = await results_of(rt, warmup + keys, timeout=30)
            assert set(pool.pids) == workers, f"a worker died:\n{pool.logs()}"

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert report.enqueued == len(warmup) + len(keys)
    # duplicates: what was in flight (prefetch per worker) plus retried
    # indeterminate publishes that had in fact been stored
    # each of the 2 workers holds its prefetch: concurrency plus the room it keeps for
    # nested waits (Worker.nested_waits, max(1, concurrency // 10) by default)
    held = concurrency + max(1, concurrency // 10)
    assert len(report.dup_exec) <= 2 * held + len(report.indeterminate), report.summary()
    # a retried indeterminate publish that had been stored is a second message:
    # its two copies may run at once (RELIABILITY §1.6: detectable by task id)
    assert report.concurrent_dup <= report.indeterminate, report.summary()
    assert all(r.state is State.SUCCESS for r in results.values())


async def test_task_longer_than_the_lease_on_a_healthy_worker_runs_once(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """C4: a task running 4x the reclaim idle time on a live worker is never
    reclaimed by the other (idle, eager) worker: the lease heartbeat keeps it."""
    lease_s = 1.0
    with rig(redis_server, ledger, namespace, tmp_path, lease_s=lease_s) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=2) as pool:
            items = [("c4-long", rt.signature(WORK, "c4-long", 4 * lease_s))]
            items += [(f"c4-short-{i}", rt.signature(WORK, f"c4-short-{i}", 0.1))
                      for i in range(6)]
            await producer.enqueue_all(items)
            await wait_for_ledger(ledger, all_done, timeout=40,
                                  what="the long and the short tasks to end ok",
                                  describe=pool.logs)
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, [k for k, _ in items], timeout=20)

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.dup_exec, report.summary()
    assert not report.concurrent_dup, report.summary()
    assert results["c4-long"].state is State.SUCCESS
    assert results["c4-long"].delivery_count == 1


async def test_result_store_serves_the_first_call_after_a_redis_restart(
    redis_server: RedisServer, namespace: str
) -> None:
    """The store's pooled connections died with the server: the first call after
    the restart must reconnect, not fail (redis-py 8 on RESP3 skips the check for
    connections the server closed)."""
    store = RedisResultStore.from_url(redis_server.url, namespace=namespace)
    async with store:
        assert await store.get("e2-missing") is None
        await redis_server.arestart(kill=True, down_s=0.5)
        assert await store.get("e2-missing") is None
