"""RELIABILITY.md row B3 on Redis: a connection reset in the middle of a publish
batch, against a redis-server the test starts and a TCP proxy it owns
(tests/faults/nemesis.py) between the producer's broker connection and Redis.

10,000 messages go out as ``enqueue_many`` batches of 1,000 (each one script
call on Redis, all or error). The proxy is throttled so that a batch takes a
while on the wire, and switched to ``reset`` once Redis holds some of the
messages, so the RST lands while a batch is in flight. Each batch either
returns (ENQ_OK) or raises (ENQ_INDET, then retried with the same task ids
after the heal, as a producer should). Then a worker drains the queue and the
ledger checks: no message confirmed and absent (lost = 0); a raised batch that
Redis had in fact stored runs twice, visible as duplicates of those ids only.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis

from brokers.base import BrokerError
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
from tests.faults.nemesis import TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(150)]

QUEUE = "default"
TOTAL = 10_000
BATCH = 1_000
#: Slow enough that a 1,000-message batch spends a moment on the wire.
THROTTLE_BYTES_PER_S = 1_000_000


async def send_batch(rt: Runtime, log: LedgerWriter, keys: list[str],
                     raised: anyio.Event) -> int:
    """Publish ``keys`` as one batch until it is confirmed; returns the tries."""
    for key in keys:
        log.write("ENQ_SENT", id=key)
    pause = 0.05
    for attempt in range(1, 61):
        try:
            await rt.enqueue_many([rt.signature(WORK, key, 0.0) for key in keys], task_ids=keys)
        except BrokerError as e:
            for key in keys:
                log.write("ENQ_INDET", id=key, err=f"{type(e).__name__}"[:100], attempt=attempt)
            raised.set()
            await anyio.sleep(pause)  # the producer's retry backoff, not a wait for work
            pause = min(pause * 2, 1.0)
            continue
        for key in keys:
            log.write("ENQ_OK", id=key)
        return attempt
    raise AssertionError(f"a batch of {len(keys)} failed 60 times in a row")


def all_done(view: LedgerView) -> bool:
    return len(view.ids("ENQ_OK")) == TOTAL and view.ids("ENQ_OK") <= view.done()


async def test_a_reset_in_the_middle_of_a_publish_batch_loses_no_confirmed_message(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    keys = [f"b3-{i:05d}" for i in range(TOTAL)]
    raw = redis.Redis(port=redis_server.port)
    log = ledger.writer("test")
    with TcpProxy(target_port=redis_server.port) as proxy:
        through = f"redis://127.0.0.1:{proxy.port}/0"
        # the broker goes through the proxy; id reservations go straight to Redis
        rt = build(through, results=redis_server.url, namespace=namespace)
        raised = anyio.Event()
        tries: list[int] = []
        async with rt:
            stream = rt.broker._queue(QUEUE).streams[0]  # type: ignore[attr-defined]
            proxy.set_mode("throttle", bytes_per_s=THROTTLE_BYTES_PER_S)

            async def produce() -> None:
                for i in range(0, TOTAL, BATCH):
                    tries.append(await send_batch(rt, log, keys[i:i + BATCH], raised))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)

                async def some_stored() -> bool:
                    return int(raw.xlen(stream)) >= 3 * BATCH

                await wait_until(some_stored, timeout=60, what="3 batches stored in Redis")
                log.write("NEMESIS", what="reset the broker connection mid-batch")
                proxy.set_mode("reset")
                # the fault lasts until the batch in flight has raised
                with anyio.fail_after(30):
                    await raised.wait()
                proxy.set_mode("throttle", bytes_per_s=THROTTLE_BYTES_PER_S)
                log.write("HEAL", what="reset")
        env = worker_env(broker=redis_server.url, results=redis_server.url,
                         namespace=namespace, ledger=ledger)
        rt = build(redis_server.url, namespace=namespace)
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                                  concurrency=50) as pool:
            await wait_for_ledger(ledger, all_done, timeout=90,
                                  what="every confirmed message to run",
                                  describe=describe(pool.logs,
                                                    lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
    raw.close()
    log.close()
    report = check(ledger.read())
    print(f"\n[B3 reset mid-batch] {TOTAL} in batches of {BATCH}, tries per batch {tries}: "
          f"{report.summary()}")
    assert report.enqueued == TOTAL
    assert report.indeterminate, "the reset made a batch raise"
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    # a raised batch that had been stored ran twice: only ids that raised
    assert set(report.dup_exec) <= report.indeterminate, report.summary()
