"""Worker-side fault rows on Redis Streams (RELIABILITY.md A4, A5, A6) against a
redis-server each test starts itself, with real worker processes.

Nothing here touches the server: the faults are signals to the worker
processes the test started (SIGTERM with a short grace, SIGSTOP/SIGCONT) and
an address-space limit on one of them (``prlimit --as``). The ledger judges.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from runtime.app import Runtime
from runtime.messages import State
from tests.faults.app import COUNTED, HOG, build
from tests.faults.harness import (
    Producer,
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

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(120)]

QUEUE = "default"


@contextmanager
def rig(server: RedisServer, ledger: Ledger, namespace: str, *, lease_s: float
        ) -> Iterator[tuple[Runtime, dict[str, str], Producer]]:
    """The producer runtime and the workers' environment; results on the same
    Redis, named explicitly (the broker URL carries broker options)."""
    url = f"{server.url}?{urlencode({'lease_s': lease_s})}"
    rt = build(url, results=server.url, namespace=namespace)
    env = worker_env(broker=url, results=server.url, namespace=namespace, ledger=ledger)
    log = ledger.writer("test")
    try:
        yield rt, env, Producer(rt, log)
    finally:
        log.close()


def signal_worker(pool: WorkerPool, pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to one worker process of ``pool`` (a pid the test started),
    noted in the ledger first."""
    assert pid in pool.pids, f"pid {pid} is not a live worker of the pool ({pool.pids})"
    pool.ledger.write("NEMESIS", what=sig.name, target=pid)
    os.kill(pid, sig)


def runs(view: LedgerView, key: str) -> list[dict[str, Any]]:
    """The STARTs of ``key`` in time order (the ledger is read file by file)."""
    return sorted(view.starts(key), key=lambda r: r["t"])


def logs_of(pool: WorkerPool) -> list[str]:
    """Every line the pool's worker processes logged."""
    return [line for path in sorted(pool.log_dir.glob("worker-*.log"))
            for line in path.read_text(errors="replace").splitlines()]


def nemesis_t(view: LedgerView, what: str) -> float:
    return next(r["t"] for r in view.by_kind["NEMESIS"] if r["what"] == what)


async def test_sigterm_with_a_grace_shorter_than_the_task_hands_it_back(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """A4: SIGTERM a worker running an 8 s task with a 2 s grace: the task is
    cancelled at the end of the grace, handed back (not left for the lease) and
    run again by the other worker as delivery 2; nothing lost, no overlap."""
    task_s, grace_s = 8.0, 2.0
    with rig(redis_server, ledger, namespace, lease_s=30) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=2, shutdown_grace_s=grace_s) as pool:
            await producer.enqueue("a4", rt.signature(COUNTED, "a4", task_s))
            view = await wait_for_ledger(ledger, lambda v: bool(v.open_starts()), timeout=30,
                                         what="a worker to start the long task",
                                         describe=pool.logs)
            victim = view.starts("a4")[0]["pid"]
            signal_worker(pool, victim, signal.SIGTERM)
            # bounds, not timings: the grace (2 s) plus a worker's start of the
            # rerun, then the rerun itself (8 s), on a loaded 2-core machine
            view = await wait_for_ledger(ledger, lambda v: "a4" in v.done(), timeout=60,
                                         what="the handed-back task to end ok",
                                         describe=describe(pool.logs,
                                                           lambda: check(ledger.read()).summary()))
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, ["a4"], timeout=20)
            await wait_until(lambda: _async_value(victim not in pool.pids), timeout=30,
                             what=f"the drained worker {victim} to exit", describe=pool.logs)
            assert (victim, 0) in pool.exits, (pool.exits, pool.logs())

    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.concurrent_dup, report.summary()
    first, second = runs(view, "a4")
    assert first["pid"] == victim and second["pid"] != victim, runs(view, "a4")
    cancelled = [r for r in view.by_kind["END"] if r["x"] == first["x"]]
    assert [r.get("err") for r in cancelled] == ["cancelled"], cancelled
    # redelivered, not retried: the same attempt, the broker's count went up
    assert (first["n"], first["a"]) == (1, 1), first
    assert second["n"] >= 2 and second["a"] == 1, second
    assert results["a4"].state is State.SUCCESS and results["a4"].delivery_count >= 2
    print(f"\n[A4 redis] grace {grace_s:g} s: rerun started "
          f"{second['t'] - nemesis_t(view, 'SIGTERM'):.2f} s after SIGTERM")


async def _async_value(value: bool) -> bool:
    return value


async def test_a_stopped_worker_loses_its_task_to_another_and_survives_its_late_ack(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """A6: SIGSTOP a worker mid-task (its TCP connections stay open, its lease
    heartbeats stop) past the lease: the other worker reclaims the task and runs
    it as delivery 2 while the stopped run still exists (a concurrent duplicate,
    visible). After SIGCONT the stopped run ends and settles late: the worker
    neither crashes nor loses anything and keeps serving."""
    lease_s, task_s = 2.0, 4.0
    with rig(redis_server, ledger, namespace, lease_s=lease_s) as (rt, env, producer):
        async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                                  count=2, concurrency=2) as pool:
            await producer.enqueue("a6", rt.signature(COUNTED, "a6", task_s))
            view = await wait_for_ledger(ledger, lambda v: bool(v.open_starts()), timeout=30,
                                         what="a worker to start the task", describe=pool.logs)
            victim = view.starts("a6")[0]["pid"]
            signal_worker(pool, victim, signal.SIGSTOP)
            try:
                # bound: the lease (2 s) plus the reclaim period, then the rerun (4 s)
                await wait_for_ledger(
                    ledger, lambda v: any(r["pid"] != victim for r in v.starts("a6"))
                    and "a6" in v.done(), timeout=60,
                    what="another worker to reclaim and finish the task",
                    describe=describe(pool.logs, lambda: check(ledger.read()).summary()))
            finally:
                signal_worker(pool, victim, signal.SIGCONT)
            view = await wait_for_ledger(
                ledger, lambda v: {r["pid"] for r in v.by_kind["END"] if r["id"] == "a6"}
                == {victim, *(r["pid"] for r in v.starts("a6"))}, timeout=30,
                what="the resumed worker to end its stale run", describe=pool.logs)
            # the resumed worker keeps serving: later tasks all complete, and it
            # is still alive once they have
            more = [f"a6-after-{i}" for i in range(20)]
            await producer.enqueue_all([(k, rt.signature(COUNTED, k, 0.2)) for k in more])
            await wait_for_ledger(ledger, lambda v: set(more) <= v.done(), timeout=60,
                                  what="the tasks enqueued after SIGCONT", describe=pool.logs)
            await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
            results = await results_of(rt, ["a6", *more], timeout=20)
            assert victim in pool.pids, f"the resumed worker died:\n{pool.logs()}"
            assert not pool.exits, pool.exits
            late = [line for line in logs_of(pool)
                    if "no longer pending" in line and f"-{victim}-" in line]
            assert late, f"the late settle is logged by the resumed worker:\n{pool.logs()}"

    view = ledger.read()
    report = check(view)
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    first, second = runs(view, "a6")
    assert first["pid"] == victim and second["pid"] != victim, runs(view, "a6")
    assert second["n"] >= 2, second  # the rerun knows it is a redelivery
    # the documented duplicate: both runs existed at once, and both ended ok
    assert report.concurrent_dup == {"a6"}, report.summary()
    assert report.dup_exec == {"a6": 2}, report.summary()
    # the first terminal result stands: the rerun's, stored while the victim slept
    assert results["a6"].state is State.SUCCESS and results["a6"].delivery_count >= 2
    print(f"\n[A6 redis] lease {lease_s:g} s: reclaimed and restarted "
          f"{second['t'] - nemesis_t(view, 'SIGSTOP'):.2f} s after SIGSTOP")


#: The address-space cap of the worker in A5 and what the task asks for: the
#: cap is above a worker's own footprint (about 0.5-0.8 GiB of virtual memory,
#: thread stacks included) and far below the task's allocation.
AS_LIMIT_MIB = 1536
HOG_MIB = 4096


async def test_a_worker_out_of_memory_fails_the_task_visibly_and_keeps_serving(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """A5: a worker under ``prlimit --as`` runs a task that allocates 4 GiB. The
    allocation fails inside the task (MemoryError; the kernel's OOM killer would
    send SIGKILL instead, which is row A1): the task is retried as attempt 2,
    then dead-lettered ``failed`` with its error stored, never acked as done;
    the worker lives on and the good tasks beside it all complete."""
    with rig(redis_server, ledger, namespace, lease_s=5) as (rt, env, producer):
        await out_of_memory_row(rt, env, producer, ledger, tmp_path, producer.enqueue_all)


async def out_of_memory_row(
    rt: Runtime, env: dict[str, str], producer: Producer, ledger: Ledger, tmp_path: Path,
    enqueue_good: Callable[[list[tuple[str, Any]]], Awaitable[object]],
) -> None:
    """Row A5 on any broker (see the tests): the hog, 20 good tasks beside it, and
    what the ledger, the dead letters and the results must show."""
    pool = WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=producer.ledger,
                      count=1, concurrency=2)
    pool.cmd = ["prlimit", f"--as={AS_LIMIT_MIB * 1024 * 1024}", "--", *pool.cmd]
    good = [f"a5-{i:02d}" for i in range(20)]
    async with rt, pool:
        await producer.enqueue("a5-hog", rt.signature(HOG, "a5-hog", HOG_MIB))
        await enqueue_good([(k, rt.signature(COUNTED, k, 0.05)) for k in good])
        letters: list[Any] = []

        async def hog_dead() -> bool:
            letters[:] = await rt.broker.dead_letters(QUEUE)
            return any(letter.envelope.id == "a5-hog" for letter in letters)

        # bound: two short runs of the hog and 20 short tasks, loaded machine
        await wait_until(hog_dead, timeout=60, what="the hog in the dead-letter queue",
                         describe=describe(pool.logs, lambda: f"dead letters: {letters}",
                                           lambda: check(ledger.read()).summary()))
        for letter in letters:
            producer.ledger.write("DLQ_SEEN", id=letter.envelope.id, reason=letter.reason)
        await wait_for_ledger(ledger, lambda v: set(good) <= v.done(), timeout=60,
                              what="the good tasks to end ok", describe=pool.logs)
        await wait_queue_settled(rt, QUEUE, timeout=20, describe_more=pool.logs)
        results = await results_of(rt, ["a5-hog", *good], timeout=20)
        assert len(pool.pids) == 1 and not pool.exits, f"the worker died:\n{pool.logs()}"

    view = ledger.read()
    report = check(view, designed_to_fail=["a5-hog"])
    assert not report.lost, report.summary()
    assert not report.dlq_false, report.summary()
    assert not report.dup_exec.keys() - {"a5-hog"}, report.summary()
    hog_runs = runs(view, "a5-hog")
    assert [r["a"] for r in hog_runs] == [1, 2], hog_runs  # retried once, then no more
    assert {r.get("err") for r in view.by_kind["END"] if r["id"] == "a5-hog"} == {"MemoryError"}
    assert [letter.reason for letter in letters if letter.envelope.id == "a5-hog"] == ["failed"]
    hog = results["a5-hog"]
    assert hog.state is State.FAILURE and hog.error is not None, hog
    assert hog.error.type == "MemoryError" and hog.attempt == 2, hog
    assert all(results[k].state is State.SUCCESS for k in good)
