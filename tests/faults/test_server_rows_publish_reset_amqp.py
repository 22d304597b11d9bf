"""RELIABILITY.md row B3 on RabbitMQ: a connection reset in the middle of a
publish batch (see ``test_server_rows_publish_reset.py`` for the Redis half and
the design). The producer's broker connection goes through a throttled TCP proxy
the test owns to a RabbitMQ node the module starts; id reservations and results
go to the shared Redis under the test's namespace. 10,000 messages in
``enqueue_many`` batches of 1,000 (publisher confirms); the proxy resets once
the queue holds some of them. Each batch returns or raises; none returned and
absent (lost = 0); a raised batch is retried with its ids, and whatever of it
the node had stored runs twice (duplicates only among ids that raised).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from tests.conftest import REDIS_URL
from tests.faults.app import build
from tests.faults.harness import (
    RabbitNode,
    WorkerPool,
    describe,
    wait_for_ledger,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, check
from tests.faults.nemesis import TcpProxy
from tests.faults.test_server_rows_publish_reset import send_batch

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.timeout(240)]

QUEUE = "default"
TOTAL = 10_000
BATCH = 1_000
THROTTLE_BYTES_PER_S = 500_000
OPTIONS = {"queue_type": "quorum", "delivery_limit": 5, "consumer_timeout_s": 60,
           "publish_timeout_s": 10}


def all_done(view: LedgerView) -> bool:
    return len(view.ids("ENQ_OK")) == TOTAL and view.ids("ENQ_OK") <= view.done()


async def test_a_reset_in_the_middle_of_a_publish_batch_loses_no_confirmed_message(
    rabbit_node: RabbitNode, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    keys = [f"b3a-{i:05d}" for i in range(TOTAL)]
    query = urlencode(OPTIONS)
    direct = f"{rabbit_node.url}?{query}"
    log = ledger.writer("test")
    with TcpProxy(target_port=rabbit_node.port) as proxy:
        through = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{query}"
        rt = build(through, results=REDIS_URL, namespace=namespace)
        watcher = build(direct, results=REDIS_URL, namespace=namespace)
        raised = anyio.Event()
        tries: list[int] = []
        async with rt, watcher:
            await watcher.broker.declare(QUEUE)
            proxy.set_mode("throttle", bytes_per_s=THROTTLE_BYTES_PER_S)

            async def produce() -> None:
                for i in range(0, TOTAL, BATCH):
                    tries.append(await send_batch(rt, log, keys[i:i + BATCH], raised))

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)

                async def some_stored() -> bool:
                    return (await watcher.broker.stats(QUEUE)).ready >= 2 * BATCH

                await wait_until(some_stored, timeout=90, what="2 batches stored in RabbitMQ",
                                 describe=rabbit_node.describe_queues)
                log.write("NEMESIS", what="reset the broker connection mid-batch")
                proxy.set_mode("reset")
                # the fault lasts until the batch in flight has raised
                with anyio.fail_after(60):
                    await raised.wait()
                proxy.set_mode("throttle", bytes_per_s=THROTTLE_BYTES_PER_S)
                log.write("HEAL", what="reset")
            env = worker_env(broker=direct, results=REDIS_URL, namespace=namespace,
                             ledger=ledger)
            async with WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                                  concurrency=50) as pool:
                await wait_for_ledger(ledger, all_done, timeout=150,
                                      what="every confirmed message to run",
                                      describe=describe(pool.logs, rabbit_node.describe_queues,
                                                        lambda: check(ledger.read()).summary()))
                await wait_queue_settled(watcher, QUEUE, timeout=60, describe_more=pool.logs)
    log.close()
    report = check(ledger.read())
    print(f"\n[B3 amqp reset mid-batch] {TOTAL} in batches of {BATCH}, tries per batch "
          f"{tries}: {report.summary()}")
    assert report.enqueued == TOTAL
    assert report.indeterminate, "the reset made a batch raise"
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert set(report.dup_exec) <= report.indeterminate, report.summary()
