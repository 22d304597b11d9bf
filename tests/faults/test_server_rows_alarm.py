"""Row B9 (RELIABILITY.md): a RabbitMQ memory or disk alarm blocks publishers.

Against a node this module starts itself (``rabbit_node`` of the fault conftest,
never the shared one on 5672), the alarm is raised at runtime with
``rabbitmqctl set_disk_free_limit`` (a limit above any free space) or
``set_vm_memory_high_watermark absolute`` (a watermark below any use), and
cleared the same way.

What RabbitMQ does: every connection turns ``blocking``; one that publishes turns
``blocked`` (a ``connection.blocked`` frame) and the server stops reading its
socket, so what it sent waits unread in the socket buffers, its confirms never
come, and neither does the answer to anything else sent on it (a queue
declare). Connections that only consume and ack are not blocked.

What taskloom does (RabbitMQ 3.10, aio-pika 10.2, aiormq 7.2): ``enqueue`` and
``enqueue_many`` await the confirm for ``publish_timeout_s``, then raise
``PublishError`` ("... publishers blocked by a memory/disk alarm; the message
may or may not be stored ..."). It is indeterminate indeed: what was sent is
stored once the alarm clears (an enqueue that gave up before then may run,
and its retry too). An enqueue with a longer timeout just waits and returns
once the alarm clears. Workers keep consuming throughout.

A bug this row found, fixed: after one publish timed out, the broker forgot
its declared topology and the next enqueue declared the queue again with no
deadline, so on a blocked connection it hung until the alarm cleared. Declares
now run inside the publish deadline, and only a "not found" or unroutable
publish makes the broker declare again.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest

from brokers.base import PublishError, TaskloomError
from runtime.app import Runtime
from tests.faults.app import COUNTED, build
from tests.faults.harness import (
    Producer,
    RabbitNode,
    RedisServer,
    WorkerPool,
    describe,
    wait_for_ledger,
    wait_queue_settled,
    wait_until,
    worker_env,
)
from tests.faults.ledger import Ledger, LedgerWriter, check

pytestmark = [pytest.mark.fault, pytest.mark.amqp, pytest.mark.timeout(150)]

QUEUE = "default"
#: Short, so that an enqueue gives up within the test.
PUBLISH_TIMEOUT_S = 3.0
#: Far longer than the whole alarm lasts in the test: this producer waits it out.
PATIENT_TIMEOUT_S = 120.0
OPTIONS = {"publish_timeout_s": PUBLISH_TIMEOUT_S, "reconnect_interval_s": 0.5}
#: A bound on one enqueue that must time out: 10 x its publish timeout, for a
#: loaded machine (connecting and closing a runtime count too).
GIVE_UP_BOUND_S = 10 * PUBLISH_TIMEOUT_S

#: (raise, clear) per alarm: a disk limit of 1 PB (more than any disk has free)
#: then RabbitMQ's default of 50 MB; a memory watermark of 1 byte then the
#: default of 0.4 of the RAM.
ALARMS = {
    "disk": (("set_disk_free_limit", str(10**15)), ("set_disk_free_limit", "50000000")),
    "memory": (("set_vm_memory_high_watermark", "absolute", "1"),
               ("set_vm_memory_high_watermark", "0.4")),
}


async def connection_states(node: RabbitNode) -> list[str]:
    """The state of each AMQP connection of the node (running, blocking, blocked...)."""
    out = await node.actl("list_connections", "-q", "state")
    return [s for s in (line.strip() for line in out.splitlines()) if s and s != "state"]


async def wait_states(node: RabbitNode, what: str, accept: Any) -> list[str]:
    """Until ``accept(states)``; polls the server (see :func:`wait_until`)."""
    last: list[str] = []

    async def probe() -> list[str] | None:
        last[:] = await connection_states(node)
        return list(last) if accept(last) else None

    # bound: rabbitmqctl takes 1-3 s a call on a loaded machine; the memory
    # monitor notices a new watermark within its 2.5 s interval
    return await wait_until(probe, timeout=30, what=what,
                            describe=lambda: f"last connection states: {last}")


@asynccontextmanager
async def alarm(node: RabbitNode, kind: str) -> AsyncIterator[None]:
    """The node under a ``kind`` alarm inside the block (its connections turned
    ``blocking``); cleared on the way out, whatever happens."""
    raise_, clear = ALARMS[kind]
    await node.actl(*raise_)
    try:
        await wait_states(node, f"the {kind} alarm to block the connections",
                          lambda states: bool(states) and all(
                              s in ("blocking", "blocked") for s in states))
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await node.actl(*clear)


async def main_queue(node: RabbitNode, namespace: str) -> tuple[int, int, int]:
    """(ready, unacked, consumers) of the namespace's queue, from ``list_queues``
    (a broker call on a blocked connection would wait for the alarm)."""
    return (await node.queues()).get(f"{namespace}.{QUEUE}", (0, 0, 0))


async def enqueue_logged(rt: Runtime, log: LedgerWriter, keys: list[str], task_s: float) -> None:
    """One ``enqueue_many`` with the ledger records of :class:`Producer` (no fault)."""
    for key in keys:
        log.write("ENQ_SENT", id=key)
    handles = await rt.enqueue_many([rt.signature(COUNTED, k, task_s) for k in keys],
                                    task_ids=keys)
    for key, handle in zip(keys, handles, strict=True):
        assert not handle.duplicate, key
        log.write("ENQ_OK", id=key)


async def test_a_disk_alarm_blocks_enqueue_until_its_timeout_and_the_worker_keeps_consuming(
    rabbit_node: RabbitNode, redis_server: RedisServer, ledger: Ledger, namespace: str,
    tmp_path: Path,
) -> None:
    """B9 (disk alarm): with a backlog in the queue and one worker on it,

    - an enqueue with a long publish timeout waits (its connection ``blocked``)
      and returns once the alarm clears: back-pressure;
    - ``rt.enqueue`` with a 3 s publish timeout raises PublishError saying why;
    - ``enqueue_many`` on a fresh runtime too, caught as a user does,
      ``except TaskloomError`` outside ``async with rt``;
    - the worker consumes and acks the whole backlog during the alarm;

    after the clear, the timed-out enqueues retried and new ones go through, and
    every confirmed enqueue is consumed: nothing lost, no worker died."""
    url = f"{rabbit_node.url}?{urlencode(OPTIONS)}"
    patient_options = {**OPTIONS, "publish_timeout_s": PATIENT_TIMEOUT_S}
    patient_url = f"{rabbit_node.url}?{urlencode(patient_options)}"
    rt = build(url, results=redis_server.url, namespace=namespace)
    patient = build(patient_url, results=redis_server.url, namespace=namespace)
    env = worker_env(broker=url, results=redis_server.url, namespace=namespace, ledger=ledger)
    log = ledger.writer("test")
    producer = Producer(rt, log)
    backlog = [f"b9-backlog-{i:02d}" for i in range(40)]
    many = [f"b9-many-{i}" for i in range(5)]
    after = [f"b9-after-{i:02d}" for i in range(20)]
    figures: dict[str, Any] = {}
    patient_done = anyio.Event()

    async def patient_enqueue() -> None:
        log.write("ENQ_SENT", id="b9-patient")
        t0 = time.monotonic()
        await patient.enqueue(patient.signature(COUNTED, "b9-patient", 0.0),
                              task_id="b9-patient")
        figures["patient_s"] = time.monotonic() - t0
        log.write("ENQ_OK", id="b9-patient")
        patient_done.set()

    try:
        async with rt, patient, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log,
                                           count=1, concurrency=2, prefetch=4) as pool:
            await enqueue_logged(patient, log, ["b9-patient-before"], 0.0)  # declares
            await enqueue_logged(rt, log, backlog, 0.5)
            await wait_for_ledger(ledger, lambda v: bool(v.ids("START") & set(backlog)),
                                  timeout=30, what="the worker to start the backlog",
                                  describe=pool.logs)
            async with anyio.create_task_group() as tg:
                async with alarm(rabbit_node, "disk"):
                    figures["at_alarm"] = await main_queue(rabbit_node, namespace)
                    figures["done_at_alarm"] = len(ledger.read().done() & set(backlog))
                    tg.start_soon(patient_enqueue)
                    await wait_states(rabbit_node, "the patient producer's connection blocked",
                                      lambda states: "blocked" in states)
                    blocked_patient = not patient_done.is_set()

                    log.write("ENQ_SENT", id="b9-timeout")
                    t0 = time.monotonic()
                    with anyio.fail_after(GIVE_UP_BOUND_S), pytest.raises(PublishError) as one:
                        await rt.enqueue(rt.signature(COUNTED, "b9-timeout", 0.0),
                                         task_id="b9-timeout")
                    figures["enqueue_s"] = time.monotonic() - t0
                    log.write("ENQ_INDET", id="b9-timeout", err=str(one.value)[:500])

                    user_rt = build(url, results=redis_server.url, namespace=namespace)
                    caught: TaskloomError | None = None
                    for key in many:
                        log.write("ENQ_SENT", id=key)
                    t0 = time.monotonic()
                    with anyio.fail_after(GIVE_UP_BOUND_S):
                        try:
                            async with user_rt:
                                await user_rt.enqueue_many(
                                    [user_rt.signature(COUNTED, k, 0.0) for k in many],
                                    task_ids=many)
                        except TaskloomError as e:
                            caught = e
                    figures["many_s"] = time.monotonic() - t0
                    for key in many:
                        log.write("ENQ_INDET", id=key, err=str(caught)[:500])

                    async def backlog_consumed() -> bool:
                        return (set(backlog) <= ledger.read().done()
                                and (await main_queue(rabbit_node, namespace))[:2] == (0, 0))

                    # bound: 40 tasks of 0.5 s on 2 runners, loaded machine
                    await wait_until(backlog_consumed, timeout=60,
                                     what="the worker to consume the backlog during the alarm",
                                     describe=describe(pool.logs, rabbit_node.describe_queues))
                    states_after_backlog = await connection_states(rabbit_node)
                    still_waiting = not patient_done.is_set()
                t_clear = time.monotonic()  # the alarm is cleared
                # bound: the patient enqueue's own timeout is 120 s; it ends
                # within a few seconds of the clear on a loaded machine
                with anyio.fail_after(60):
                    await patient_done.wait()
                figures["patient_after_clear_s"] = time.monotonic() - t_clear

            # after the clear: the producer retries what timed out, and goes on
            for key in ["b9-timeout", *many]:
                await producer.enqueue(key, rt.signature(COUNTED, key, 0.0))
            for key in after:
                await producer.enqueue(key, rt.signature(COUNTED, key, 0.0))
            confirmed = ledger.read().ids("ENQ_OK")
            # bound: ~30 short tasks, loaded machine
            await wait_for_ledger(ledger, lambda v: confirmed <= v.done(), timeout=60,
                                  what="every confirmed enqueue to run",
                                  describe=describe(pool.logs, rabbit_node.describe_queues,
                                                    lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
            assert len(pool.pids) == 1 and not pool.exits, f"the worker died:\n{pool.logs()}"
    finally:
        log.close()

    # the publishers waited, the consumer did not
    assert blocked_patient and still_waiting, figures
    assert "blocked" in states_after_backlog, states_after_backlog
    ready, unacked, _ = figures["at_alarm"]
    assert ready + unacked > 0, figures  # the backlog was consumed during the alarm
    # the time-out: a PublishError that says what happened and what it means
    message = str(one.value)
    assert "memory/disk alarm" in message and "may or may not be stored" in message, message
    assert isinstance(caught, PublishError), repr(caught)
    assert type(caught).__module__ == "brokers.base", repr(caught)
    assert "publish_many (5 messages)" in str(caught) and "memory/disk alarm" in str(caught)
    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert {"b9-timeout", *many} <= report.indeterminate, report.summary()
    print(f"\n[B9 amqp, disk alarm] backlog (ready, unacked) at the alarm {figures['at_alarm']}, "
          f"{figures['done_at_alarm']}/40 done: the worker finished it during the alarm; "
          f"rt.enqueue raised PublishError after {figures['enqueue_s']:.2f} s (timeout "
          f"{PUBLISH_TIMEOUT_S:g} s); enqueue_many on a fresh runtime, incl. connect and "
          f"close, after {figures['many_s']:.2f} s; the patient enqueue waited "
          f"{figures['patient_s']:.2f} s and returned {figures['patient_after_clear_s']:.2f} s "
          f"after the clear; timed-out then retried: run twice {len(report.dup_exec)} "
          f"{sorted(report.dup_exec)}; lost {len(report.lost)}")


async def test_a_second_enqueue_during_a_memory_alarm_times_out_too(
    rabbit_node: RabbitNode, namespace: str,
) -> None:
    """B9 (memory alarm): every enqueue during the alarm gives up after
    ``publish_timeout_s``, not only the first one."""
    rt = build(f"{rabbit_node.url}?{urlencode(OPTIONS)}", results="memory://",
               namespace=namespace)
    async with rt:
        await rt.enqueue(rt.signature(COUNTED, "b9-first", 0.0))  # declares the queue
        async with alarm(rabbit_node, "memory"):
            with anyio.fail_after(GIVE_UP_BOUND_S), pytest.raises(PublishError):
                await rt.enqueue(rt.signature(COUNTED, "b9-blocked-1", 0.0))
            with anyio.fail_after(GIVE_UP_BOUND_S), pytest.raises(PublishError) as second:
                await rt.enqueue(rt.signature(COUNTED, "b9-blocked-2", 0.0))
    assert "memory/disk alarm" in str(second.value), str(second.value)
