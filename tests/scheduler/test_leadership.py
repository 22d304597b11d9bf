"""Leadership with real processes on the shared Redis: three scheduler processes,
one leader at a time; a killed leader is replaced within the lease; a paused
leader that wakes after losing its lease publishes nothing that runs twice;
schedules added at run time reach every scheduler.

The ledger (publishes, seen by a middleware in each scheduler process; runs, seen
by the test's own worker) lives outside the scheduler under test."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from runtime.middleware import CallNext, Middleware, TaskContext
from runtime.ops.scheduler import Schedules, every
from tests.conftest import REDIS_URL
from tests.faults.ledger import Ledger, LedgerView
from tests.scheduler.proc import TASK, build

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 3.0
#: Generous bound for waits: three Python processes starting on a loaded 2-core box.
WAIT_S = 40


class Ran(Middleware):
    """Counts every execution by task id, in the test's worker."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()

    async def execute(self, ctx: TaskContext, call_next: CallNext) -> Any:
        self.ran[ctx.message.id] += 1
        return await call_next(ctx)


@contextmanager
def schedulers(n: int, namespace: str, ledger_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-m", "tests.scheduler.proc", REDIS_URL, namespace,
                               str(ledger_dir), str(LEASE_S)], cwd=ROOT) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:  # only the processes this test started, by pid
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(timeout=30)


@asynccontextmanager
async def worker(namespace: str) -> AsyncIterator[tuple[Ran, Schedules]]:
    ran = Ran()
    rt = build(REDIS_URL, namespace, [ran])
    async with rt, rt.worker():
        schedules = Schedules(rt)
        try:
            yield ran, schedules
        finally:
            async with schedules.store:
                await schedules.store.purge()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]


async def wait_for(ledger: Ledger, check: Callable[[LedgerView], bool], what: str) -> LedgerView:
    with anyio.fail_after(WAIT_S):
        while True:
            view = ledger.read()
            if check(view):
                return view
            await anyio.sleep(0.1)
    raise AssertionError(what)


def leaders(view: LedgerView) -> list[dict[str, Any]]:
    return [r for r in view.by_kind["VIEW"] if r["leading"]]


def current_leader(view: LedgerView) -> int | None:
    latest: dict[int, bool] = {}
    for r in view.by_kind["VIEW"]:
        latest[r["pid"]] = r["leading"]
    leading = [pid for pid, on in latest.items() if on]
    return leading[0] if len(leading) == 1 else None


def ticks(view: LedgerView, name: str) -> list[int]:
    """The tick times (s) published for schedule ``name``, once each, in order."""
    return sorted(int(i.rsplit(":", 1)[1]) // 1000 for i in view.ids("PUB")
                  if i.startswith(f"sched:{name}:"))


def check_once(view: LedgerView, ran: Counter[str]) -> None:
    published = Counter(r["id"] for r in view.by_kind["PUB"])
    assert [i for i, n in published.items() if n > 1] == [], "a tick was published twice"
    assert [i for i, n in ran.items() if n > 1] == [], "a tick ran twice"
    assert set(ran) <= set(published)


async def runs_of(ran: Ran, ids: set[str]) -> None:
    with anyio.fail_after(WAIT_S):
        while not ids <= set(ran.ran):
            await anyio.sleep(0.1)


async def test_three_schedulers_publish_each_tick_once(namespace: str, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    async with worker(namespace) as (ran, schedules):
        with schedulers(3, namespace, tmp_path):
            await wait_for(ledger, lambda v: len(ticks(v, "beat")) >= 3, "no ticks")
            # a schedule added at run time reaches every scheduler's view and fires
            await schedules.add("added", build_sig(schedules), every(1))
            view = await wait_for(
                ledger, lambda v: len({r["pid"] for r in v.by_kind["VIEW"]
                                       if "added" in r["names"]}) == 3 and
                len(ticks(v, "added")) >= 3, "the added schedule is not in every view")
            started = time.monotonic()
            while time.monotonic() - started < 27:  # 27 s more: over 30 s of 1-second ticks
                await anyio.sleep(0.5)
            view = ledger.read()
        await runs_of(ran, view.ids("PUB"))
        check_once(view, ran.ran)
        assert len({r["pid"] for r in leaders(view)}) == 1, "the leadership moved without a fault"
        for name in ("beat", "added"):
            got = ticks(view, name)
            assert got == list(range(got[0], got[-1] + 1)), f"{name}: a tick is missing: {got}"
        assert len(ticks(view, "beat")) >= 30


def build_sig(schedules: Schedules) -> Any:
    return schedules.rt.signature(TASK, "added")


async def test_a_killed_leader_is_replaced_within_the_lease(namespace: str, tmp_path: Path
                                                            ) -> None:
    ledger = Ledger(tmp_path)
    async with worker(namespace) as (ran, _):
        with schedulers(3, namespace, tmp_path):
            view = await wait_for(ledger, lambda v: len(ticks(v, "beat")) >= 3
                                  and current_leader(v) is not None, "no leader")
            old = current_leader(view)
            assert old is not None
            os.kill(old, signal.SIGKILL)
            killed_at = time.monotonic()
            view = await wait_for(
                ledger, lambda v: any(r["t"] > killed_at and r["pid"] != old
                                      for r in v.by_kind["PUB"])
                and len([r for r in v.by_kind["PUB"] if r["t"] > killed_at]) >= 3,
                "no new leader")
        await runs_of(ran, view.ids("PUB"))
        check_once(view, ran.ran)
        before = [r for r in view.by_kind["PUB"] if r["t"] <= killed_at]
        after = [r for r in view.by_kind["PUB"] if r["t"] > killed_at]
        assert {r["pid"] for r in after} - {old} and old not in {r["pid"] for r in after}
        got = ticks(view, "beat")
        last_before = max(int(r["id"].rsplit(":", 1)[1]) // 1000 for r in before)
        first_after = min(int(r["id"].rsplit(":", 1)[1]) // 1000 for r in after)
        # the handover costs at most the lease plus the time to notice and start
        # (renewal slack, a loaded machine): generous, the lease is the point
        assert first_after - last_before <= LEASE_S + 4, got
        assert all(b - a == 1 for a, b in itertools.pairwise(got)
                   if b <= last_before or a >= first_after), f"a gap outside the handover: {got}"


async def test_a_paused_leader_that_wakes_publishes_nothing_twice(namespace: str, tmp_path: Path
                                                                  ) -> None:
    ledger = Ledger(tmp_path)
    async with worker(namespace) as (ran, _):
        with schedulers(3, namespace, tmp_path):
            view = await wait_for(ledger, lambda v: len(ticks(v, "beat")) >= 3
                                  and current_leader(v) is not None, "no leader")
            old = current_leader(view)
            assert old is not None
            os.kill(old, signal.SIGSTOP)
            stopped_at = time.monotonic()
            # another takes over while it sleeps, and publishes a few ticks
            await wait_for(ledger, lambda v: len([r for r in v.by_kind["PUB"]
                                                  if r["t"] > stopped_at]) >= 3, "no new leader")
            os.kill(old, signal.SIGCONT)
            woke_at = time.monotonic()
            # it wakes believing it leads: its next tick or renewal finds the lease gone
            view = await wait_for(ledger, lambda v: any(
                r["pid"] == old and not r["leading"] and r["t"] > woke_at
                for r in v.by_kind["VIEW"]) and len([r for r in v.by_kind["PUB"]
                                                     if r["t"] > woke_at]) >= 3,
                "the woken leader did not step down")
        await runs_of(ran, view.ids("PUB"))
        check_once(view, ran.ran)
        assert [r["id"] for r in view.by_kind["PUB"]
                if r["pid"] == old and r["t"] > stopped_at] == []
