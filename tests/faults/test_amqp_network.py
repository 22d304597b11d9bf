"""Network faults between a real worker process and RabbitMQ (issue 10, finding 3;
RELIABILITY.md rows B3/B4): a TCP proxy the test owns sits between the worker
and a RabbitMQ node the module starts; results go to the shared Redis under the
test's namespace (not through the proxy).

The worker uses the broker's *default* heartbeat and watchdog (nothing about
them in its URL): what is proven is what a user gets without tuning. Under a
10 s reset and a 10 s blackhole (sockets kept, no byte moves) the worker keeps
running (same pid), no task is lost, no finished task is dead-lettered, every
result is stored, and work resumes within seconds of the heal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import anyio
import pytest

from runtime.messages import State
from tests.conftest import REDIS_URL
from tests.faults.app import WORK, build
from tests.faults.harness import (
    Producer,
    RabbitNode,
    WorkerPool,
    describe,
    results_of,
    wait_for_ledger,
    wait_queue_settled,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerView, check
from tests.faults.nemesis import Mode, TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

QUEUE = "default"
#: The fault lasts this long (the issue's reproduction: 10 s).
FAULT_S = 10.0
#: Quorum queues with an explicit delivery limit (3.10 has none by default). No
#: ``heartbeat`` here: the defaults are what is under test.
OPTIONS = {
    "queue_type": "quorum",
    "delivery_limit": 5,
    # must match the test node's rabbitmq.conf (RabbitNode: consumer_timeout = 60000)
    "consumer_timeout_s": 60,
    "publish_timeout_s": 10,
}


@pytest.fixture
def proxy(rabbit_node: RabbitNode) -> Iterator[TcpProxy]:
    with TcpProxy(target_port=rabbit_node.port) as p:
        yield p


def all_done(view: LedgerView) -> bool:
    return bool(view.ids("ENQ_OK")) and view.ids("ENQ_OK") <= view.done()


def first_start_after(view: LedgerView, t: float) -> float | None:
    times = [r["t"] for r in view.by_kind["START"] if r["t"] > t]
    return min(times) if times else None


async def fault_mid_load(node: RabbitNode, proxy: TcpProxy, ledger: Ledger, namespace: str,
                         log_dir: Path, mode: Mode, prefix: str, *,
                         expect_stall: bool = False) -> float:
    """Run a backlog through one worker behind ``proxy``, put the proxy in ``mode``
    for :data:`FAULT_S` while the queue has ready messages, heal it, and check the
    promises. Returns the recovery time: heal -> first task started after it."""
    query = urlencode(OPTIONS)
    direct = f"{node.url}?{query}"
    through = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?{query}"
    results = REDIS_URL
    rt = build(direct, results=results, namespace=namespace)
    env = worker_env(broker=through, results=results, namespace=namespace, ledger=ledger)
    writer = ledger.writer("test")
    producer = Producer(rt, writer)
    try:
        async with rt, WorkerPool(env=env, log_dir=log_dir, ledger=writer, count=1,
                                  concurrency=4) as pool:
            [worker] = pool.pids
            warmup = [f"{prefix}-w{i}" for i in range(4)]
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.0)) for k in warmup])
            await wait_for_ledger(ledger, all_done, timeout=60,
                                  what="the warm-up tasks (the worker is consuming)",
                                  describe=pool.logs)
            # A backlog the worker cannot finish before the fault: 400 tasks of
            # 200 ms at concurrency 4 take >= 20 s, and the fault starts at once.
            keys = [f"{prefix}-{i:04d}" for i in range(400)]
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.2)) for k in keys])
            await wait_for_ledger(ledger, lambda v: len(v.done() & set(keys)) >= 20, timeout=60,
                                  what="the backlog to be consumed", describe=pool.logs)
            writer.write("NEMESIS", what=mode)
            proxy.set_mode(mode)
            await anyio.sleep(FAULT_S)  # the fault itself lasts FAULT_S
            proxy.set_mode("pass")
            healed = time.monotonic()  # the ledger's clock (CLOCK_MONOTONIC)
            writer.write("HEAL", what=mode)
            # More work after the heal: the worker must pick it up too.
            after = [f"{prefix}-a{i:03d}" for i in range(20)]
            await producer.enqueue_all([(k, rt.signature(WORK, k, 0.0)) for k in after])
            # Generous: the promise is "within seconds"; the bound absorbs a
            # loaded 2-core machine, the measured figure is printed below.
            view = await wait_for_ledger(
                ledger, lambda v: first_start_after(v, healed) is not None, timeout=60,
                what=f"a task to start after the {mode} healed",
                describe=describe(pool.logs, node.describe_queues))
            started = first_start_after(view, healed)
            assert started is not None
            recovery_s = started - healed
            await wait_for_ledger(ledger, all_done, timeout=120,
                                  what=f"every confirmed task to end ok after the {mode}",
                                  describe=describe(pool.logs, node.describe_queues,
                                                    lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=60, describe_more=pool.logs)
            found = await results_of(rt, warmup + keys + after, timeout=60)
            dead = await rt.broker.dead_letters(QUEUE)
            assert pool.pids == [worker], f"the worker died or was replaced:\n{pool.logs()}"
            worker_log = pool.logs(lines=400)
    finally:
        writer.close()

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert report.enqueued == len(warmup) + len(keys) + len(after), report.summary()
    assert not dead, f"finished tasks were dead-lettered: {dead}"
    assert all(r.state is State.SUCCESS for r in found.values())
    assert len(found) == len(warmup) + len(keys) + len(after)
    if expect_stall:  # detected, one clear line per detection (not one per check)
        stalls = worker_log.count("amqp.consumer_stalled")
        assert 1 <= stalls <= 3, (stalls, worker_log)
    print(f"\n{mode}: {FAULT_S:g} s fault, work resumed {recovery_s:.2f} s after the heal "
          f"(dup_exec={len(report.dup_exec)})")
    return recovery_s


async def test_blackhole_of_10s_is_detected_and_work_resumes(
    rabbit_node: RabbitNode, proxy: TcpProxy, ledger: Ledger, namespace: str, tmp_path: Path,
) -> None:
    """B4: a 10 s blackhole (no RST) with the default heartbeat: the worker notices,
    re-establishes its connection and consumer, and resumes within seconds."""
    recovery = await fault_mid_load(rabbit_node, proxy, ledger, namespace, tmp_path / "logs",
                                    "blackhole", "bh")
    # generous (2 cores shared by several test runs); the issue saw >= 110 s
    assert recovery < 30, recovery


async def test_frame_loss_of_10s_is_detected_and_work_resumes(
    rabbit_node: RabbitNode, proxy: TcpProxy, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """Finding 3: a 10 s blackhole that drops bytes (acks and deliveries lost, the
    stream still in step afterwards). With a 60 s heartbeat the consumer went
    silent for minutes; now the heartbeat or the watchdog re-establishes it."""
    recovery = await fault_mid_load(rabbit_node, proxy, ledger, namespace,
                                    tmp_path / "logs", "drop", "fl", expect_stall=True)
    assert recovery < 30, recovery


async def test_reset_of_10s_is_survived_and_work_resumes(
    rabbit_node: RabbitNode, proxy: TcpProxy, ledger: Ledger, namespace: str, tmp_path: Path,
) -> None:
    """B3: every connection reset for 10 s (and new ones reset at once): the worker
    keeps retrying, reconnects after the heal and resumes within seconds."""
    recovery = await fault_mid_load(rabbit_node, proxy, ledger, namespace, tmp_path / "logs",
                                    "reset", "rs")
    assert recovery < 30, recovery
