"""Worker processes sharing a real Redis broker: faults a single process cannot
show. The ledger (written by the task bodies) is the judge of what ran."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from runtime import Runtime
from runtime.process.liveness import store_for
from runtime.process.serve import EXIT_OK
from tests.supervisor.conftest import APP, Env, pid_alive, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.fault]

FAST = ("--pool-size", "0", "--heartbeat", "0.5")


@asynccontextmanager
async def producer(env: Env) -> AsyncIterator[Runtime]:
    """A runtime of the test process on the same broker, knowing the tasks by name."""
    rt = Runtime(broker=env.broker, results="memory://", namespace=env.namespace)

    @rt.task(name="sv.work")
    async def work(key: str, sleep_s: float = 0.0) -> str:
        raise AssertionError("the producer never runs tasks")

    @rt.task(name="sv.suicide")
    async def suicide(key: str) -> None:
        raise AssertionError("the producer never runs tasks")

    @rt.task(name="sv.block")
    async def block(seconds: float) -> str:
        raise AssertionError("the producer never runs tasks")

    async with rt:
        yield rt


async def enqueue_work(rt: Runtime, keys: list[str], sleep_s: float) -> None:
    await rt.enqueue_many([rt.signature("sv.work", key, sleep_s) for key in keys])


def ended(env: Env) -> set[str]:
    return set(env.ledger.keys("END"))


async def test_a_child_killed_mid_task_is_replaced_and_its_tasks_are_redelivered(
        redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--processes", "2", "--concurrency", "4", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    first = set(cmd.ready_pids())
    keys = [f"k{i}" for i in range(40)]
    async with producer(redis_env) as rt:
        await enqueue_work(rt, keys, 0.5)

    def busy_child() -> int | None:
        done = {(r["pid"], r["key"]) for r in redis_env.ledger.records("END")}
        for r in redis_env.ledger.records("START"):
            if r["pid"] in first and (r["pid"], r["key"]) not in done:
                return int(r["pid"])
        return None

    victim = await wait_until(busy_child, what="a child running a task")
    os.kill(victim, signal.SIGKILL)  # a pid our supervisor started
    await wait_until(lambda: ended(redis_env) == set(keys), what="every task to end")
    # what the victim had started but not finished ran again elsewhere
    unfinished = ({r["key"] for r in redis_env.ledger.records("START") if r["pid"] == victim}
                  - {r["key"] for r in redis_env.ledger.records("END") if r["pid"] == victim})
    assert unfinished, "the victim was killed with tasks in flight"
    reran = {r["key"] for r in redis_env.ledger.records("END") if r["pid"] != victim}
    assert unfinished <= reran
    # the child was replaced by a new process
    await wait_until(lambda: set(cmd.ready_pids()) - first - {victim}, what="a replacement")
    assert len(cmd.live_children()) == 2 and victim not in cmd.live_children()
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


async def test_a_task_that_kills_its_process_every_time_is_dead_lettered(
        redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--processes", "2", "--concurrency", "1", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    keys = [f"g{i}" for i in range(20)]
    async with producer(redis_env) as rt:
        await rt.enqueue(rt.signature("sv.suicide", "poison"))
        await enqueue_work(rt, keys, 0.05)
        broker = rt.broker

        async def dead() -> list[str]:
            return [d.reason for d in await broker.dead_letters("default")]

        await wait_until(lambda: ended(redis_env) == set(keys), what="the good tasks")
        with anyio.fail_after(60):
            while not (reasons := await dead()):
                await anyio.sleep(0.1)
        stats = await broker.stats("default")
    assert reasons == ["delivery_limit"]
    assert stats.dead == 1 and stats.ready == 0
    # max_deliveries=3 on the test broker: at most three crashes, no fork bomb
    assert 1 <= redis_env.ledger.keys("START").count("poison") <= 3
    assert cmd.proc.poll() is None  # the supervisor lives on
    assert 1 <= len(cmd.deaths()) <= 3
    listing = redis_env.run("dlq", APP, "--queue", "default")
    assert listing.returncode == 0 and "delivery_limit" in listing.stdout
    assert "sv.suicide" in listing.stdout
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


async def test_sigterm_under_load_finishes_in_flight_tasks_and_runs_nothing_twice(
        redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--processes", "2", "--concurrency", "3",
                          "--shutdown-grace", "30", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    keys = [f"t{i}" for i in range(30)]
    async with producer(redis_env) as rt:
        await enqueue_work(rt, keys, 1.0)
    await wait_until(lambda: len(redis_env.ledger.records("START")) >= 4, what="tasks running")
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK
    started = redis_env.ledger.keys("START")
    assert started and set(started) == ended(redis_env)  # in-flight tasks finished
    assert len(started) < len(keys)  # the rest went back to the broker
    # a new worker runs what is left; nothing runs twice
    again = redis_env.start("worker", APP, "--concurrency", "30", *FAST)
    await wait_until(lambda: ended(redis_env) == set(keys), what="the rest of the tasks")
    again.signal(signal.SIGTERM)
    assert await again.wait() == EXIT_OK
    runs = Counter(redis_env.ledger.keys("START"))
    assert set(runs) == set(keys) and max(runs.values()) == 1


async def test_a_killed_supervisor_leaves_no_worker_and_loses_no_task(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--processes", "2", "--concurrency", "4",
                          "--shutdown-grace", "5", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    children = cmd.child_pids()
    keys = [f"s{i}" for i in range(20)]
    async with producer(redis_env) as rt:
        await enqueue_work(rt, keys, 0.3)
    await wait_until(lambda: redis_env.ledger.records("START"), what="tasks running")
    cmd.signal(signal.SIGKILL)
    await wait_until(lambda: not any(pid_alive(p) for p in children), 30,
                     "the orphaned children to exit")
    again = redis_env.start("worker", APP, "--processes", "2", *FAST)
    await wait_until(lambda: ended(redis_env) == set(keys), what="every task to end")
    again.signal(signal.SIGTERM)
    assert await again.wait() == EXIT_OK


async def test_children_are_recycled_after_max_tasks(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--max-tasks-per-child", "5", "--concurrency", "2",
                          *FAST)
    await wait_until(cmd.ready_pids, what="a ready child")
    keys = [f"r{i}" for i in range(24)]
    async with producer(redis_env) as rt:
        await enqueue_work(rt, keys, 0.2)
    await wait_until(lambda: ended(redis_env) == set(keys), what="every task to end")
    assert cmd.logs("worker process recycled; starting a replacement")
    assert len({r["pid"] for r in redis_env.ledger.records("END")}) >= 2
    runs = Counter(redis_env.ledger.keys("START"))
    assert max(runs.values()) == 1  # recycling drains: nothing runs twice
    assert cmd.deaths() == []
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


async def test_children_are_recycled_past_their_memory_limit(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--max-memory-per-child", "1MiB", *FAST)
    await wait_until(lambda: len(cmd.logs("worker process recycled; starting a replacement")) >= 2,
                     what="two recycles")
    reasons = [r["reason"] for r in cmd.logs("worker process recycled; starting a replacement")]
    assert all(reason.startswith("RSS ") for reason in reasons)
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK


async def test_status_lists_the_live_workers_and_queue_depths(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--processes", "2", *FAST)
    await wait_until(lambda: len(cmd.ready_pids()) == 2, what="two ready children")
    rt = Runtime(broker=redis_env.broker, results="memory://", namespace=redis_env.namespace)
    store = store_for(rt)
    try:
        with anyio.fail_after(30):
            while len(beats := await store.list()) < 2:
                await anyio.sleep(0.1)
        assert {b.pid for b in beats} == set(cmd.ready_pids())
        assert all(b.queues == ["default"] for b in beats)
        out = redis_env.run("status", APP, columns=250)
        assert out.returncode == 0, out.stderr
        assert "workers (2 live)" in out.stdout
        for pid in cmd.ready_pids():
            assert str(pid) in out.stdout
        assert "queues" in out.stdout and "default" in out.stdout
        cmd.signal(signal.SIGTERM)
        assert await cmd.wait() == EXIT_OK
        assert await store.list() == []  # a drained worker removes its heartbeat
    finally:
        await store.aclose()


async def test_purge_drops_the_ready_messages(redis_env: Env) -> None:
    async with producer(redis_env) as rt:
        await enqueue_work(rt, ["p1", "p2", "p3"], 0.0)
        out = redis_env.run("purge", APP, "--queue", "default", "--yes")
        assert out.returncode == 0, out.stderr
        assert "purged 3 message(s) from default" in out.stdout
        assert (await rt.broker.stats("default")).ready == 0


async def test_a_worker_process_names_the_task_that_blocks_its_loop(redis_env: Env) -> None:
    cmd = redis_env.start("worker", APP, "--lag-threshold", "0.1", *FAST)
    await wait_until(lambda: cmd.logs("worker started"), what="the worker")
    async with producer(redis_env) as rt:
        handle = await rt.enqueue(rt.signature("sv.block", 0.5))
    warned = await wait_until(
        lambda: [r for r in cmd.logs() if r.get("task") == "sv.block" and "lag_ms" in r],
        what="a lag warning naming sv.block")
    assert warned[0]["task_id"] == handle.id
    assert warned[0]["lag_ms"] >= 100
    cmd.signal(signal.SIGTERM)
    assert await cmd.wait() == EXIT_OK
