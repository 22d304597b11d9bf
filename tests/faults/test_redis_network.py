"""Network faults between a worker and Redis (issue 10, finding 1): a TCP proxy
owned by the test (tests/faults/nemesis.py) sits between real CLI worker
processes and a redis-server the test starts; the broker and the result store
both go through it. The producer talks to Redis directly, so load keeps arriving
during the fault.

Under a 10 s reset and a 10 s blackhole the worker stays up (same pid), no task
is lost, no finished task is dead-lettered, every result is stored, and work
resumes within seconds of the heal (the recovery time is measured and printed).
Supervised (``--processes 2``), the supervisor keeps restarting children that
cannot reach Redis instead of giving up with exit 3.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from runtime.app import Runtime
from runtime.messages import State
from tests.faults.app import WORK, build
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
from tests.faults.nemesis import Mode, TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(150)]

QUEUE = "default"
#: How long each fault lasts: the issue's scenario.
FAULT_S = 10.0
#: Task body duration (short: the point is many in flight across the fault).
TASK_S = 0.05


def all_done(view: LedgerView) -> bool:
    return bool(view.ids("ENQ_OK")) and view.ids("ENQ_OK") <= view.done()


class Load:
    """A paced producer (straight to Redis) that runs until stopped."""

    def __init__(self, rt: Runtime, producer: Producer) -> None:
        self.rt = rt
        self.producer = producer
        self.keys: list[str] = []
        self.during: list[str] = []  # confirmed while the fault was on
        self.fault_on = False
        self.stop = anyio.Event()

    async def run(self, prefix: str) -> None:
        i = 0
        while not self.stop.is_set():
            key = f"{prefix}-{i:05d}"
            i += 1
            self.keys.append(key)
            await self.producer.enqueue(key, self.rt.signature(WORK, key, TASK_S))
            if self.fault_on:
                self.during.append(key)
            # pacing (~100/s), not a wait for work: keeps the backlog realistic
            await anyio.sleep(0.01)


@asynccontextmanager
async def rig(redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path,
              *, processes: int = 1) -> AsyncIterator[tuple[Runtime, TcpProxy, WorkerPool, Load]]:
    with TcpProxy(target_port=redis_server.port) as proxy:
        through = f"redis://127.0.0.1:{proxy.port}/0"
        rt = build(redis_server.url, results=redis_server.url, namespace=namespace)
        env = worker_env(broker=through, results=through, namespace=namespace, ledger=ledger)
        log = ledger.writer("test")
        pool = WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                          concurrency=50)
        if processes > 1:
            pool.cmd += ["--processes", str(processes)]
        try:
            async with rt, pool:
                yield rt, proxy, pool, Load(rt, Producer(rt, log))
        finally:
            log.close()


async def hold_fault(proxy: TcpProxy, mode: Mode, load: Load) -> float:
    """The fault for FAULT_S seconds (the duration is the fault's design, not a
    wait for work); returns the monotonic time of the heal."""
    load.fault_on = True
    with proxy.fault(mode):
        await anyio.sleep(FAULT_S)
    load.fault_on = False
    return time.monotonic()


async def run_fault(mode: Mode, redis_server: RedisServer, ledger: Ledger, namespace: str,
                    tmp_path: Path) -> None:
    async with rig(redis_server, ledger, namespace, tmp_path) as (rt, proxy, pool, load):
        [pid] = pool.pids
        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run, mode)
            await wait_for_ledger(ledger, lambda v: len(v.done()) >= 50, timeout=60,
                                  what="the worker to finish 50 tasks before the fault",
                                  describe=pool.logs)
            healed = await hold_fault(proxy, mode, load)
            during = list(load.during)
            assert during, "load kept arriving during the fault"

            def resumed(view: LedgerView) -> bool:
                return bool(view.ids("START") & set(during))

            view = await wait_for_ledger(ledger, resumed, timeout=60,
                                         what="work to resume after the heal",
                                         describe=pool.logs)
            first = min(r["t"] for r in view.by_kind["START"] if r["id"] in set(during))
            recovery_s = max(0.0, first - healed)
            print(f"\n[{mode}] {FAULT_S:g} s fault: work resumed {recovery_s:.2f} s after "
                  f"the heal ({len(during)} tasks enqueued during the fault)")
            load.stop.set()
        await wait_for_ledger(ledger, all_done, timeout=60,
                              what="every enqueued task to end ok",
                              describe=describe(pool.logs, lambda: check(ledger.read()).summary()))
        await wait_queue_settled(rt, QUEUE, timeout=30, describe_more=pool.logs)
        results = await results_of(rt, load.keys, timeout=30)
        dead = await rt.broker.dead_letters(QUEUE)
        assert pool.pids == [pid] and not pool.exits, (
            f"the worker died: exits {pool.exits}\n{pool.logs(60)}")
        logs = pool.logs(10_000)
    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not report.unexpected, report.summary()
    assert not dead, [(d.envelope.id, d.reason) for d in dead]
    assert all(r.state is State.SUCCESS for r in results.values())
    assert "Traceback" not in logs, logs
    # one line when an outage starts and one when it ends, not one per attempt (a
    # blackhole may end before a socket timeout notices it: then there is no line)
    outages = logs.count("] lost the connection to Redis;")
    assert outages <= 3, logs
    assert logs.count("] Redis is reachable again;") == outages, logs
    if mode == "reset":
        assert outages >= 1, logs
    # generous: "within seconds" on a 2-core machine shared by several test runs
    assert recovery_s < 20, recovery_s


async def test_worker_survives_a_10s_reset_under_load(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    await run_fault("reset", redis_server, ledger, namespace, tmp_path)


async def test_worker_survives_a_10s_blackhole_under_load(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    await run_fault("blackhole", redis_server, ledger, namespace, tmp_path)


async def test_supervisor_keeps_restarting_children_that_cannot_reach_redis(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    """``--processes 2`` under a 10 s reset: both children are killed as it
    starts, so their replacements cannot connect while the reset lasts; the
    supervisor keeps restarting them (it does not give up with exit 3, as it did
    when both children crashed) and the replacements serve once Redis is back."""
    async with rig(redis_server, ledger, namespace, tmp_path, processes=2) as (
            rt, proxy, pool, load):
        [supervisor] = pool.pids

        async def two_children() -> list[Any] | None:
            children = psutil.Process(supervisor).children()
            return children if len(children) == 2 else None

        async with anyio.create_task_group() as tg:
            tg.start_soon(load.run, "sup")
            await wait_for_ledger(ledger, lambda v: len(v.done()) >= 50, timeout=60,
                                  what="the workers to finish 50 tasks before the fault",
                                  describe=pool.logs)
            children = await wait_until(two_children, timeout=30, what="two children")
            load.fault_on = True
            with proxy.fault("reset"):
                for child in children:  # SIGKILL: replacements start while Redis is unreachable
                    child.kill()
                await anyio.sleep(FAULT_S)  # the fault's duration, not a wait for work
            load.fault_on = False
            during = set(load.during)
            await wait_for_ledger(ledger, lambda v: bool(v.ids("START") & during), timeout=60,
                                  what="work to resume after the heal", describe=pool.logs)
            load.stop.set()
        await wait_for_ledger(ledger, all_done, timeout=60,
                              what="every enqueued task to end ok",
                              describe=describe(pool.logs, lambda: check(ledger.read()).summary()))
        await wait_until(two_children, timeout=60, what="two children after the heal",
                         describe=pool.logs)
        await results_of(rt, load.keys, timeout=30)
        assert pool.pids == [supervisor] and not pool.exits, (
            f"the supervisor exited: {pool.exits}\n{pool.logs(80)}")
        dead = await rt.broker.dead_letters(QUEUE)
        logs = pool.logs(10_000)
    report = check(ledger.read())
    assert not report.lost, report.summary()
    assert not dead, [(d.envelope.id, d.reason) for d in dead]
    # the replacements exited as unreachable: one line when that started, one when it ended
    assert logs.count("] worker processes cannot reach the broker") == 1, logs
    assert logs.count("] worker processes reach their servers again") == 1, logs
    assert "crash-looping" not in logs, logs
