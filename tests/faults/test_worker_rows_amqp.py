"""Worker-side fault rows on RabbitMQ (RELIABILITY.md A4, A5, A6, B6, B8, D2) against an
isolated node the module starts itself, with real worker processes; results go
to a redis-server each test starts itself.

The node's ``consumer_timeout`` is short (10 s) and checked every second
(``channel_tick_interval`` in its advanced.config; RabbitMQ's default checks it
once a minute), so row A6 outlives it within a test. Every task's time limit is
below it (``TASK_TIMEOUT_S``), as the runtime requires.

What A6 found on RabbitMQ 3.10: the consumer timeout does not take a delivery
back from a worker that is stopped with its TCP connection alive. The server
sends ``channel.close`` and logs the timeout (again every tick), but the channel
ends, and its deliveries return to the queue, only once the client answers
``close-ok``, which a stopped process never does. What takes the delivery back
is the AMQP heartbeat (10 s by default in taskloom): the server drops the silent
connection after about two missed heartbeats.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
import pytest

from runtime.app import Runtime
from runtime.canvas import Signature
from runtime.errors import ConfigError, EnqueueError
from runtime.messages import State
from tests.faults.app import COUNTED, POISON, build
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
from tests.faults.ledger import Ledger, check
from tests.faults.test_worker_rows_redis import (
    nemesis_t,
    out_of_memory_row,
    runs,
    signal_worker,
)

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.timeout(150)]

QUEUE = "default"
CONSUMER_TIMEOUT_S = 10
TASK_TIMEOUT_S = 8.0
DELIVERY_LIMIT = 2
OPTIONS = {
    "queue_type": "quorum",
    "delivery_limit": DELIVERY_LIMIT,
    "consumer_timeout_s": CONSUMER_TIMEOUT_S,  # the node's rabbitmq.conf, below
    "publish_timeout_s": 10,
    "reconnect_interval_s": 0.5,
}


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """This module's node: consumer_timeout 10 s, checked every second."""
    root = tmp_path_factory.mktemp("rabbit")
    node = RabbitNode(root, consumer_timeout_ms=CONSUMER_TIMEOUT_S * 1000)
    (root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
    node.start()
    try:
        yield node
    finally:
        node.close()


@contextmanager
def rig(node: RabbitNode, results: RedisServer, ledger: Ledger, namespace: str,
        **options: Any) -> Iterator[tuple[Runtime, dict[str, str], Producer]]:
    url = f"{node.url}?{urlencode({**OPTIONS, **options})}"
    rt = build(url, results=results.url, namespace=namespace, task_timeout_s=TASK_TIMEOUT_S)
    env = worker_env(broker=url, results=results.url, namespace=namespace, ledger=ledger)
    env["TASKLOOM_FAULT_TASK_TIMEOUT"] = str(TASK_TIMEOUT_S)
    log = ledger.writer("test")
    try:
        yield rt, env, Producer(rt, log)
    finally:
        log.close()


async def test_sigterm_with_a_grace_shorter_than_the_task_hands_it_back(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """A4: SIGTERM a worker running a 6 s task with a 2 s grace: the task is
    cancelled at the end of the grace and its delivery returned; the other
    worker runs it as delivery 2; nothing lost, no overlap."""
    task_s, grace_s = 6.0, 2.0
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=2, shutdown_grace_s=grace_s) as pool:
            await producer.enqueue("a4", rt.signature(COUNTED, "a4", task_s))
            view = await wait_for_ledger(ledger, lambda v: bool(v.open_starts()), timeout=30,
                                         what="a worker to start the long task",
                                         describe=pool.logs)
            victim = view.starts("a4")[0]["pid"]
            signal_worker(pool, victim, signal.SIGTERM)
            # bound: the grace (2 s), the redelivery, the rerun (6 s), loaded machine
            view = await wait_for_ledger(ledger, lambda v: "a4" in v.done(), timeout=60,
                                         what="the handed-back task to end ok",
                                         describe=describe(pool.logs, rabbit_node.describe_queues,
                                                           lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, ["a4"], timeout=20)

            async def victim_gone() -> bool:
                return victim not in pool.pids

            await wait_until(victim_gone, timeout=30, what=f"the drained worker {victim} to exit",
                             describe=pool.logs)
            assert (victim, 0) in pool.exits, (pool.exits, pool.logs())

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.concurrent_dup, report.summary()
    first, second = runs(view, "a4")
    assert first["pid"] == victim and second["pid"] != victim, runs(view, "a4")
    cancelled = [r for r in view.by_kind["END"] if r["x"] == first["x"]]
    assert [r.get("err") for r in cancelled] == ["cancelled"], cancelled
    assert (first["n"], first["a"]) == (1, 1), first
    assert second["n"] >= 2 and second["a"] == 1, second
    assert results["a4"].state is State.SUCCESS and results["a4"].delivery_count >= 2
    print(f"\n[A4 amqp] grace {grace_s:g} s: rerun started "
          f"{second['t'] - nemesis_t(view, 'SIGTERM'):.2f} s after SIGTERM")


def log_of(pool: WorkerPool, pid: int) -> list[str]:
    """The lines logged by worker process ``pid`` (its worker name holds its pid)."""
    for path in sorted(pool.log_dir.glob("worker-*.log")):
        lines = path.read_text(errors="replace").splitlines()
        if any(f"worker=vm-{pid}-" in line or f"-{pid}-" in line for line in lines[:3]):
            return lines
    return []


async def consumers_at_least(node: RabbitNode, namespace: str, count: int, *, timeout: float,
                             pool: WorkerPool) -> None:
    seen: list[int] = []

    async def probe() -> bool:
        seen[:] = [await node.consumers(namespace)]
        return seen[0] >= count

    await wait_until(probe, timeout=timeout, what=f"{count} consumers on {namespace}'s queues",
                     describe=lambda: f"last count: {seen}\n{pool.logs()}")


async def test_a_stopped_worker_past_the_consumer_timeout_loses_its_task_and_survives(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """A6: SIGSTOP a worker mid-task (TCP alive) past the node's consumer_timeout
    (10 s) and the heartbeat timeout (about 2 x 10 s): RabbitMQ drops the silent
    connection and redelivers the task to the other worker, which runs it as
    delivery 2 while the stopped run still exists (a visible concurrent
    duplicate). After SIGCONT its late settle is not fatal (logged as
    ``amqp.stale_delivery`` when the worker saw its channel close first; else the
    ack goes out on a closed channel and the server drops the connection): the
    worker connects and subscribes again and keeps serving."""
    task_s = 4.0
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=2) as pool:
            await consumers_at_least(rabbit_node, namespace, 2, timeout=30, pool=pool)
            await producer.enqueue("a6", rt.signature(COUNTED, "a6", task_s))
            view = await wait_for_ledger(ledger, lambda v: bool(v.open_starts()), timeout=30,
                                         what="a worker to start the task", describe=pool.logs)
            victim = view.starts("a6")[0]["pid"]
            signal_worker(pool, victim, signal.SIGSTOP)
            try:
                # bound: the heartbeat timeout (~20-30 s: the consumer timeout cannot
                # take the delivery back, see the module doc) + the rerun (4 s)
                await wait_for_ledger(
                    ledger, lambda v: any(r["pid"] != victim for r in v.starts("a6"))
                    and "a6" in v.done(), timeout=60,
                    what="the other worker to get the task back and finish it",
                    describe=describe(pool.logs, rabbit_node.describe_queues,
                                      lambda: check(ledger.read()).summary()))
            finally:
                signal_worker(pool, victim, signal.SIGCONT)
            view = await wait_for_ledger(
                ledger, lambda v: any(r["pid"] == victim for r in v.by_kind["END"]
                                      if r["id"] == "a6"), timeout=30,
                what="the resumed worker to end its stale run", describe=pool.logs)
            await consumers_at_least(rabbit_node, namespace, 2, timeout=45, pool=pool)
            more = [f"a6-after-{i}" for i in range(20)]
            await producer.enqueue_all([(k, rt.signature(COUNTED, k, 0.2)) for k in more])
            await wait_for_ledger(ledger, lambda v: set(more) <= v.done(), timeout=60,
                                  what="the tasks enqueued after SIGCONT", describe=pool.logs)
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, ["a6", *more], timeout=20)
            assert victim in pool.pids and not pool.exits, f"a worker died:\n{pool.logs()}"
            # its late ack went out on a channel the server had closed (basic.ack has
            # no reply: the server answers with a connection error); what the
            # worker logs is its consumer coming back
            victim_log = log_of(pool, victim)
            assert any("amqp.consumer_resubscribed" in line for line in victim_log), (
                f"the resumed worker subscribes again:\n{pool.logs()}")
            stale = [line for line in victim_log if "amqp.stale_delivery" in line]

    view = ledger.read()
    report = check(view)
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert not report.dlq_false, report.summary()
    first, second = runs(view, "a6")
    assert first["pid"] == victim and second["pid"] != victim, runs(view, "a6")
    assert second["n"] >= 2, second
    assert report.concurrent_dup == {"a6"}, report.summary()
    assert report.dup_exec == {"a6": 2}, report.summary()
    assert results["a6"].state is State.SUCCESS and results["a6"].delivery_count >= 2
    ends = [r for r in view.by_kind["END"] if r["id"] == "a6" and r["pid"] == victim]
    print(f"\n[A6 amqp] consumer_timeout {CONSUMER_TIMEOUT_S} s: redelivered and restarted "
          f"{second['t'] - nemesis_t(view, 'SIGSTOP'):.2f} s after SIGSTOP; the stale run "
          f"ended {ends[0].get('err') or 'ok'}; {len(stale)} stale settle(s) logged")


async def enqueue_batch(producer: Producer, items: list[tuple[str, Signature[Any]]]) -> None:
    """Enqueue ``items`` in batches of 200 (one confirm round per batch), with
    the ledger records of :meth:`Producer.enqueue` (no fault happens here)."""
    for at in range(0, len(items), 200):
        chunk = items[at:at + 200]
        for key, _ in chunk:
            producer.ledger.write("ENQ_SENT", id=key)
        handles = await producer.rt.enqueue_many([sig for _, sig in chunk],
                                                 task_ids=[key for key, _ in chunk])
        for (key, _), handle in zip(chunk, handles, strict=True):
            assert not handle.duplicate, key
            producer.ledger.write("ENQ_OK", id=key)


async def consumer_channels(node: RabbitNode) -> list[int]:
    """Unacked deliveries of each channel that has a consumer (the node is this
    module's: only this test's workers consume on it)."""
    out = await node.actl("list_channels", "-q", "consumer_count", "messages_unacknowledged")
    held = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) > 0:
            held.append(int(parts[1]))
    return held


async def test_a_slow_consumer_holds_at_most_its_prefetch_and_a_new_worker_gets_work(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """B8: one slow worker (prefetch 10, 2 runners, 0.2 s tasks) under a backlog
    of 300: RabbitMQ holds at most 10 unacked on its channel while the rest
    waits ready in the queue. A second worker that joins gets work at once and
    runs its fair share of what is left (a worker that had taken the backlog
    into its memory would leave it nothing)."""
    prefetch, total = 10, 300
    keys = [f"b8-{i:03d}" for i in range(total)]
    samples: list[tuple[str, list[int], int, int]] = []  # (phase, unacked per channel, ready, rss)

    async def sample(phase: str, rt: Runtime, pool: WorkerPool, count: int) -> None:
        """Wait until ``count`` consumer channels hold work, then record them with
        the queue's ready count (a passive declare: exact, where list_queues'
        quorum queue figures lag)."""
        last: list[Any] = []

        async def probe() -> tuple[list[int], int] | None:
            held = await consumer_channels(rabbit_node)
            ready = (await rt.broker.stats(QUEUE)).ready
            last[:] = [held, ready]
            return (held, ready) if len(held) == count and all(held) else None

        held, ready = await wait_until(probe, timeout=30, what=f"{count} busy consumer(s)",
                                       describe=lambda: f"last: {last}\n{pool.logs()}")
        rss = sum(psutil.Process(pid).memory_info().rss for pid in pool.pids)
        samples.append((phase, held, ready, rss))

    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs-1", ledger=producer.ledger,
                                  count=1, concurrency=2, prefetch=prefetch) as first:
            await consumers_at_least(rabbit_node, namespace, 1, timeout=30, pool=first)
            await enqueue_batch(producer, [(k, rt.signature(COUNTED, k, 0.2)) for k in keys])
            for _ in range(3):
                await sample("alone", rt, first, 1)
            joined = time.monotonic()
            async with WorkerPool(env=env, log_dir=tmp_path / "logs-2", ledger=producer.ledger,
                                  count=1, concurrency=2, prefetch=prefetch) as second:
                newcomer = second.pids[0]
                view = await wait_for_ledger(
                    ledger, lambda v: any(r["pid"] == newcomer for r in v.by_kind["START"]),
                    timeout=30, what="the second worker to start a task", describe=second.logs)
                for _ in range(2):
                    await sample("both", rt, second, 2)
                # bound: 300 tasks of 0.2 s on 2 x 2 runners, on a loaded machine
                view = await wait_for_ledger(ledger, lambda v: set(keys) <= v.done(), timeout=90,
                                             what="every task to end ok",
                                             describe=describe(first.logs, second.logs))
                await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=second.logs)

    report = check(ledger.read())
    assert not report.lost and not report.dup_exec, report.summary()
    for phase, held, ready, _ in samples:
        assert all(n <= prefetch for n in held), samples  # never past the prefetch
        if phase == "alone":
            assert ready > 0, samples  # the backlog stays in the broker
    starts = sorted(view.by_kind["START"], key=lambda r: r["t"])
    first_new = next(r["t"] for r in starts if r["pid"] == newcomer)
    left = [r for r in starts if r["t"] >= first_new]
    share = sum(1 for r in left if r["pid"] == newcomer)
    assert share * 3 >= len(left), (share, len(left))  # about half; a third at least
    rss = [s[3] // 2**20 for s in samples if s[0] == "alone"]
    print(f"\n[B8 amqp] prefetch {prefetch}: unacked per consumer "
          f"{[s[1] for s in samples]}, ready {[s[2] for s in samples]}; the new worker's "
          f"first task {first_new - joined:.2f} s after it was started, then {share} of the "
          f"{len(left)} tasks left; first worker RSS {rss} MiB")


async def poison_beside_good_tasks(rt: Runtime, producer: Producer, ledger: Ledger,
                                   pool: WorkerPool, node: RabbitNode, *, good: int
                                   ) -> tuple[list[Any], list[str]]:
    """Enqueue ``good`` tasks with the poison in their middle; wait until the
    poison is dead-lettered and every good task ended ok or was dead-lettered
    too. Returns the dead letters (each written to the ledger as DLQ_SEEN) and
    the good keys."""
    keys = [f"d2-{i:04d}" for i in range(good)]
    items: list[tuple[str, Signature[Any]]] = [(k, rt.signature(COUNTED, k, 0.0))
                                               for k in keys]
    items.insert(good // 2, ("d2-poison", rt.signature(POISON, "d2-poison")))
    await enqueue_batch(producer, items)
    letters: list[Any] = []

    async def settled() -> bool:
        letters[:] = await rt.broker.dead_letters(QUEUE, limit=good + 1)
        dead = {letter.envelope.id for letter in letters}
        return "d2-poison" in dead and set(keys) <= ledger.read().done() | dead

    # bound: 1,000 short tasks and three crash-and-respawn cycles, loaded machine
    await wait_until(settled, timeout=90, what="the poison dead-lettered, every good task done",
                     describe=describe(pool.logs, node.describe_queues,
                                       lambda: f"{len(letters)} dead letters",
                                       lambda: check(ledger.read()).summary()))
    for letter in letters:
        producer.ledger.write("DLQ_SEEN", id=letter.envelope.id, reason=letter.reason,
                              count=letter.delivery_count)
    await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
    return letters, keys


@pytest.mark.parametrize(("concurrency", "prefetch"), [(4, 10), (1, 1)])
async def test_a_poison_that_kills_its_worker_beside_1000_good_tasks(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path, concurrency: int, prefetch: int,
) -> None:
    """D2: a task that SIGKILLs its worker, in the middle of 1,000 good tasks, on
    a quorum queue with delivery_limit 2, two workers respawned when they die.

    Each crash returns every delivery its worker held, and RabbitMQ counts a
    delivery for each of them: a good task held beside the poison in all three
    crashes is dead-lettered with it (collateral, ``dlq_false``). The bound is
    prefetch - 1 (only what shares the poison's consumer can share its crashes);
    with ``--prefetch 1 --concurrency 1`` (README: isolating a poison) it is 0."""
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=concurrency, prefetch=prefetch,
                                  respawn=True) as pool:
            await consumers_at_least(rabbit_node, namespace, 2, timeout=30, pool=pool)
            letters, keys = await poison_beside_good_tasks(rt, producer, ledger, pool,
                                                           rabbit_node, good=1000)

    view = ledger.read()
    report = check(view, designed_to_fail=["d2-poison"])
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    crashes = [e for e in view.by_kind["EXIT"] if e["rc"] == -9]
    assert len(view.starts("d2-poison")) == len(crashes) == DELIVERY_LIMIT + 1, report.summary()
    reasons = {letter.envelope.id: letter.reason for letter in letters}
    assert reasons["d2-poison"] == "delivery_limit", reasons
    assert report.dlq_false <= set(keys), report.summary()
    assert len(report.dlq_false) <= prefetch - 1, report.summary()
    # collateral is counted, never silent: each is in the DLQ with the poison's reason
    assert all(reasons[k] == "delivery_limit" for k in report.dlq_false), reasons
    print(f"\n[D2 amqp] concurrency {concurrency}, prefetch {prefetch}: "
          f"dlq_false={len(report.dlq_false)} (bound {prefetch - 1}), "
          f"good tasks run twice or more: {len(report.dup_exec.keys() - {'d2-poison'})}, "
          f"crashes {len(crashes)}")



async def test_a_worker_out_of_memory_fails_the_task_visibly_and_keeps_serving(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """A5: a worker under ``prlimit --as`` runs a task that allocates 4 GiB: the
    allocation raises MemoryError in the task (a kernel OOM kill would be a
    SIGKILL: row A1); it is retried as attempt 2, then dead-lettered ``failed``
    with its error stored; the worker lives on and the good tasks complete."""
    with rig(rabbit_node, redis_server, ledger, namespace) as (rt, env, producer):
        async def enqueue_good(items: list[tuple[str, Any]]) -> None:
            await enqueue_batch(producer, items)

        await out_of_memory_row(rt, env, producer, ledger, tmp_path, enqueue_good)

# -- B6: the time limit stays below the consumer timeout --------------------------------


def test_a_time_limit_past_the_consumer_timeout_is_refused_at_registration(
    rabbit_node: RabbitNode, namespace: str,
) -> None:
    """B6, the guard: with the node's consumer timeout in the URL (10 s), a task
    whose time limit reaches it is refused where it is declared, with an error
    that names the task, both figures and what to do; a task without a limit
    gets 90% of the consumer timeout."""
    url = f"{rabbit_node.url}?{urlencode(OPTIONS)}"
    with pytest.raises(ConfigError) as refused:
        build(url, results="memory://", namespace=namespace,
              task_timeout_s=CONSUMER_TIMEOUT_S)
    message = str(refused.value)
    assert "'faults.work' has timeout=10" in message, message
    assert f"consumer timeout of {CONSUMER_TIMEOUT_S}s" in message, message
    assert f"timeout < {CONSUMER_TIMEOUT_S}" in message and "consumer_timeout" in message
    rt = Runtime(broker=url, results="memory://", namespace=namespace)
    assert rt.default_time_limit == pytest.approx(0.9 * CONSUMER_TIMEOUT_S)


async def test_a_per_call_time_limit_past_the_consumer_timeout_is_refused_at_enqueue(
    rabbit_node: RabbitNode, redis_server: RedisServer, namespace: str,
) -> None:
    """B6, per call: ``.set(timeout=)`` at or past the consumer timeout is refused
    at enqueue (nothing sent), as the decorator refuses it, on a single call and
    on a later step of a chain (which the worker would publish too late to
    refuse); caught the way a user catches it, outside ``async with rt``."""
    url = f"{rabbit_node.url}?{urlencode(OPTIONS)}"
    rt = build(url, results=redis_server.url, namespace=namespace,
               task_timeout_s=TASK_TIMEOUT_S)
    too_long = 2 * CONSUMER_TIMEOUT_S
    refused: list[str] = []
    for target in (
        rt.signature(COUNTED, "b6-call", 0.0).set(timeout=too_long),
        rt.signature(COUNTED, "b6-first", 0.0)
        | rt.registry[COUNTED].si("b6-second", 0.0).set(timeout=too_long),
    ):
        try:
            async with rt:
                await rt.enqueue(target)
        except EnqueueError as e:
            refused.append(str(e))
    async with rt:
        ready = (await rt.broker.stats(QUEUE)).ready
    assert len(refused) == 2, refused
    for message in refused:
        assert f"consumer timeout of {CONSUMER_TIMEOUT_S:g}s" in message, message
        assert "nothing was sent" in message and f"below {CONSUMER_TIMEOUT_S:g}" in message
        assert f"timeout={too_long:g}" in message, message
    assert ready == 0

