"""Fault tests on RabbitMQ (RELIABILITY.md rows A1, B1, D1) against an isolated
node the module starts itself, with real worker processes. Results go to a
redis-server each test starts itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from runtime.app import Runtime
from runtime.messages import State
from tests.faults.app import POISON, WORK, build
from tests.faults.harness import (
    Producer,
    RabbitNode,
    RedisServer,
    WorkerPool,
    describe,
    results_of,
    wait_for_ledger,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, check

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.timeout(120)]

QUEUE = "default"
#: The broker URL options of these tests: quorum queues (3.10 has no default
#: delivery limit, so it is set explicitly).
DELIVERY_LIMIT = 2
OPTIONS = {
    "queue_type": "quorum",
    "delivery_limit": DELIVERY_LIMIT,
    # must match the test node's rabbitmq.conf (RabbitNode: consumer_timeout = 60000)
    "consumer_timeout_s": 60,
    "publish_timeout_s": 10,
    "reconnect_interval_s": 0.5,
}


def all_done(view: LedgerView) -> bool:
    return bool(view.ids("ENQ_OK")) and view.ids("ENQ_OK") <= view.done()


@contextmanager
def rig(node: RabbitNode, results: RedisServer, ledger: Ledger, namespace: str
        ) -> Iterator[tuple[Runtime, dict[str, str], Producer]]:
    url = f"{node.url}?{urlencode(OPTIONS)}"
    rt = build(url, results=results.url, namespace=namespace)
    env = worker_env(broker=url, results=results.url, namespace=namespace, ledger=ledger)
    log = ledger.writer("test")
    try:
        yield rt, env, Producer(rt, log)
    finally:
        log.close()


async def consumers_back(node: RabbitNode, namespace: str, count: int, *, timeout: float,
                         describe_more: Callable[[], str] = lambda: "") -> None:
    seen: list[int] = []

    async def probe() -> bool:
        seen[:] = [await node.consumers(namespace)]
        return seen[0] >= count

    await wait_until(probe, timeout=timeout, what=f"{count} consumers on the queues of "
                     f"{namespace}", describe=lambda: f"last count: {seen}\n{describe_more()}")


async def test_sigkill_of_a_worker_mid_task_is_redelivered_and_completed(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """A1: kill -9 one of two workers mid-task; RabbitMQ returns its unacked
    deliveries when the connection drops and the other worker completes them."""
    concurrency = 4
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
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
    assert interrupted <= set(report.dup_exec), report.summary()
    assert len(report.dup_exec) <= concurrency, report.summary()
    assert all(r.state is State.SUCCESS for r in results.values())
    for key in interrupted:
        assert results[key].delivery_count >= 2, (key, results[key])


async def restart_mid_load(node: RabbitNode, results: RedisServer, ledger: Ledger,
                           namespace: str, log_dir: Path, prefix: str,
                           nemesis: list[tuple[str, Callable[[], None]]]) -> None:
    """Publish and consume while ``nemesis`` runs (each step in a thread, after
    50 confirmed enqueues); then every confirmed task must complete, both
    workers must be subscribed again and alive, and duplicates stay bounded."""
    concurrency = 4
    with rig(node, results, ledger, namespace) as (rt, env, producer):
        warmup = [f"{prefix}-w{i}" for i in range(4)]
        keys: list[str] = []
        fault_over = anyio.Event()
        async with rt, WorkerPool(env=env, log_dir=log_dir, ledger=producer.ledger,
                                  count=2, concurrency=concurrency) as pool:
            workers = set(pool.pids)
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.0)) for k in warmup])
            await wait_for_ledger(ledger, all_done, timeout=30,
                                  what="the warm-up tasks (a worker is consuming)",
                                  describe=pool.logs)
            await consumers_back(node, namespace, 2, timeout=30, describe_more=pool.logs)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: producer.enqueue_through(
                    lambda i: (f"{prefix}-{i:04d}", rt.signature(WORK, f"{prefix}-{i:04d}", 0.02)),
                    fault_over, after=50, keys=keys))
                await producer.after(len(warmup) + 50).wait()
                for what, step in nemesis:
                    producer.ledger.write("NEMESIS", what=what)
                    await anyio.to_thread.run_sync(step)
                fault_over.set()
            await consumers_back(node, namespace, 2, timeout=45, describe_more=pool.logs)
            await wait_for_ledger(ledger, all_done, timeout=60,
                                  what="every confirmed task to end ok after the restart",
                                  describe=describe(pool.logs, node.describe_queues,
                                                    lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
            found = await results_of(rt, warmup + keys, timeout=30)
            assert set(pool.pids) == workers, f"a worker died:\n{pool.logs()}"

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert report.enqueued == len(warmup) + len(keys)
    # duplicates: the unacked deliveries of both workers (prefetch each) plus
    # retried indeterminate publishes that had in fact been stored
    # each of the 2 workers holds its prefetch: concurrency plus the room it keeps for
    # nested waits (Worker.nested_waits, max(1, concurrency // 10) by default)
    held = concurrency + max(1, concurrency // 10)
    assert len(report.dup_exec) <= 2 * held + len(report.indeterminate), report.summary()
    # a retried indeterminate publish that had been stored is a second message:
    # its two copies may run at once (RELIABILITY §1.6: detectable by task id)
    assert report.concurrent_dup <= report.indeterminate, report.summary()
    assert all(r.state is State.SUCCESS for r in found.values())


async def test_stop_app_and_start_app_mid_load_loses_nothing_and_consumers_return(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """B1: ``rabbitmqctl stop_app`` / ``start_app`` while tasks are published and
    consumed: publishes during the outage raise and are retried with the same
    id; both workers reconnect and re-subscribe; every confirmed task completes."""
    await restart_mid_load(rabbit_node, redis_server, ledger, namespace, tmp_path / "logs",
                           "b1", [("rabbitmqctl stop_app", rabbit_node.stop_app),
                                  ("rabbitmqctl start_app", rabbit_node.start_app)])


async def test_poison_task_that_kills_its_worker_is_dead_lettered_at_the_delivery_limit(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """D1: a task that SIGKILLs its own process on every run is dead-lettered once
    the quorum queue's delivery limit is passed; the pool (respawned like a
    supervisor would) is not wedged and every other task completes."""
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        good = [f"d1-{i:02d}" for i in range(10)]
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=1, prefetch=1, respawn=True) as pool:
            await producer.enqueue("d1-poison", rt.signature(POISON, "d1-poison"))
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.05)) for k in good])

            seen: list[object] = []

            async def poison_dead() -> bool:
                letters = await rt.broker.dead_letters(QUEUE)
                seen[:] = letters
                for letter in letters:
                    producer.ledger.write("DLQ_SEEN", id=letter.envelope.id, reason=letter.reason,
                                          count=letter.delivery_count)
                return any(letter.envelope.id == "d1-poison" for letter in letters)

            await wait_for_ledger(ledger, lambda v: set(good) <= v.done(), timeout=60,
                                  what="the good tasks to end ok",
                                  describe=describe(pool.logs, rabbit_node.describe_queues))
            await wait_until(poison_dead, timeout=60, what="the poison task in the DLQ",
                             describe=describe(pool.logs, rabbit_node.describe_queues,
                                              lambda: f"dead letters: {seen}",
                                              lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, good, timeout=20)

    view = ledger.read()
    report = check(view, designed_to_fail=["d1-poison"])
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert not report.dlq_false, report.summary()
    runs = len(view.starts("d1-poison"))
    # the first delivery plus one per allowed redelivery, then the DLQ
    assert runs == DELIVERY_LIMIT + 1, (runs, report.summary())
    crashes = [e for e in view.by_kind["EXIT"] if e["rc"] == -9]
    assert len(crashes) == runs
    assert all(r.state is State.SUCCESS for r in results.values())
    assert not any(k in report.dup_exec for k in good), report.summary()


async def test_kill_9_of_the_node_mid_load_loses_no_confirmed_task(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """B2: ``kill -9`` of the node's beam while tasks are published and consumed,
    then a restart on the same ports and data: every confirmed message survives
    (durable quorum queue + publisher confirms). Last in the module: it restarts
    the module's node."""
    await restart_mid_load(rabbit_node, redis_server, ledger, namespace, tmp_path / "logs",
                           "b2", [("kill -9 beam, restart the node", rabbit_node.restart)])
