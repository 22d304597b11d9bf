"""A chord whose worker processes are SIGKILLed mid-way: the body still runs exactly once.

Two worker processes (``python -m runtime.cli worker tests.canvas.fault_app:rt``)
run a 100-member chord (shared Redis / RabbitMQ, one namespace per test); one of
them SIGKILLs itself once, at a kill point of
tests/canvas/fault_app.py:

- ``member``: a header member, after its side effect (a ledger record), before its ack;
- ``join``: after the last member was counted into the join, before the body is published;
- ``body_published``: after the body was published, before that member's ack.

Two more kill points: the body's worker dying after storing its result but
before publishing the next chain step (the next step still runs), and in the
middle of the body (it runs again within seconds). And a member redelivered
after the worker's claim lease has lapsed does not run a finished body again.

The killed delivery comes back (Redis: its lease of 1 s runs out and another
consumer claims it; RabbitMQ: the channel closes with the process) and runs
again. The ledger, written by the task bodies in every process, shows the
member twice and the body once, with every result in header order.

After the pool has drained and stopped, a worker embedded in the test runs
until the queue is empty, so a duplicate left behind (a second body message,
a delayed retry of it) is handled before the ledger is read.
"""

from __future__ import annotations

import collections
import signal
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import pytest

from runtime import chord
from runtime.errors import ConnectionFailed, ResultTimeout
from runtime.messages import Result, State
from tests.canvas.conftest import purge, purge_amqp_delays
from tests.canvas.fault_app import AFTER, BODY, MEMBER, build
from tests.conftest import AMQP_URL, REDIS_URL, server_missing
from tests.faults.harness import WorkerPool, describe, wait_for_ledger
from tests.faults.ledger import Ledger, LedgerView

pytestmark = [pytest.mark.fault, pytest.mark.redis]

HEADER = 100
VICTIM = 37
LEASE_S = 1
#: Bound on one test: two worker processes start (~1-2 s), one dies, its
#: delivery comes back after the lease, the pool drains.
TEST_LIMIT = 90.0
WAIT_S = 40.0
#: How long a body killed mid-run may take to run again (claim lease 6 s, plus
#: the 3 s between two looks of a duplicate, plus the broker lease).
RERUN_S = 20.0
#: A Redis lease longer than the worker's claim lease (runtime/worker.py CLAIM_LEASE_S).
LATE_LEASE_S = 8.0

BROKERS = [
    pytest.param("redis", id="redis"),
    pytest.param("amqp", id="amqp", marks=pytest.mark.amqp),
]

KILLS = [
    pytest.param("member", id="member"),
    pytest.param("join", id="join"),
    pytest.param("body_published", id="body_published"),
]



def with_query(url: str, **options: object) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query), *((k, str(v)) for k, v in options.items())]
    return urlunsplit(parts._replace(query=urlencode(query)))


def broker_url(kind: str, lease_s: float = LEASE_S) -> str:
    return with_query(REDIS_URL, lease_s=lease_s) if kind == "redis" else AMQP_URL


def body_runs(view: LedgerView) -> list[list[int]]:
    return [r["values"] for r in view.by_kind["BODY"]]


def member_runs(view: LedgerView, i: int) -> int:
    return sum(1 for r in view.by_kind["MEMBER"] if r["i"] == i)


def executions(view: LedgerView) -> str:
    """For failure messages: the executions (task, message id, delivery count, pid)
    other than header members that ran once, and the kills."""
    runs = collections.Counter(r["id"] for r in view.by_kind["EXEC"])
    shown = [r for r in view.by_kind["EXEC"] if r["task"] != MEMBER or runs[r["id"]] > 1]
    shown += view.by_kind["KILL_SELF"] + view.by_kind["EXIT"]
    return "\n" + "\n".join(
        f"{r['t']:.3f} pid={r['pid']} " + " ".join(f"{k}={v}" for k, v in r.items()
                                                   if k not in ("t", "pid"))
        for r in sorted(shown, key=lambda r: r["t"]))


class Outcome(NamedTuple):
    view: LedgerView
    final: Result | None
    pool: WorkerPool


async def run_with_a_kill(kind: str, kill: str, namespace: str, tmp_path: Path, *,
                          then_after: bool = False, wait_s: float = WAIT_S,
                          lease_s: float = LEASE_S) -> Outcome:
    """Run the chord (``| after`` if ``then_after``) on two worker processes, one
    of which dies once at ``kill``. Waits ``wait_s`` for the result; if it came,
    stops the pool (drain) and runs what is left in the queue in this process."""
    directory = tmp_path / "ledger"
    ledger = Ledger(directory)
    url = broker_url(kind, lease_s)
    producer = build(url, REDIS_URL, namespace, str(directory))
    env = {"TASKLOOM_CANVAS_BROKER": url, "TASKLOOM_CANVAS_RESULTS": REDIS_URL,
           "TASKLOOM_CANVAS_NS": namespace, "TASKLOOM_CANVAS_DIR": str(directory),
           "TASKLOOM_CANVAS_KILL": kill}
    member, body, after = (producer.registry[n] for n in (MEMBER, BODY, AFTER))
    canvas = chord([member.s(i, crash=(kill == "member" and i == VICTIM)) for i in range(HEADER)],
                   body.s())
    if then_after:
        canvas = canvas | after.s()
    try:
        async with producer:
            pass
    except ConnectionFailed as e:
        server_missing(kind, e)
    # one task at a time per process at ``body_published``: else the dying process's
    # other runner may take the body it just published and die in the middle of it
    concurrency = 1 if kill == "body_published" else 2
    try:
        with anyio.fail_after(TEST_LIMIT):
            async with producer:
                pool = WorkerPool(env=env, log_dir=tmp_path / "logs",
                                  ledger=ledger.writer("harness"), count=2,
                                  concurrency=concurrency, app="tests.canvas.fault_app:rt",
                                  shutdown_grace_s=5.0)
                finished = True
                async with pool:
                    handle = await producer.enqueue(canvas)
                    await wait_for_ledger(ledger, lambda v: bool(v.by_kind["KILL_SELF"]),
                                          timeout=WAIT_S, what=f"a worker to die at {kill!r}",
                                          describe=describe(pool.logs))
                    try:
                        await handle.result(timeout=wait_s)
                    except ResultTimeout:
                        finished = False
                if finished:
                    # the pool drained and stopped; run whatever it left behind, here
                    async with producer.worker() as worker:
                        await worker.idle()
                final = await producer.results.get(handle.id)
    finally:
        await purge(producer)
        if kind == "amqp":
            await purge_amqp_delays(namespace)
    return Outcome(ledger.read(), final, pool)


@pytest.mark.parametrize("kill", KILLS)
@pytest.mark.parametrize("kind", BROKERS)
async def test_a_chord_body_runs_once_when_a_killed_members_delivery_comes_back(
        kind: str, kill: str, namespace: str, tmp_path: Path) -> None:
    view, final, pool = await run_with_a_kill(kind, kill, namespace, tmp_path)
    expected = [i * 7 for i in range(HEADER)]
    kills = view.by_kind["KILL_SELF"]
    assert [k["where"] for k in kills] == [kill]
    assert any(rc == -signal.SIGKILL for _, rc in pool.exits), pool.exits
    killed_member = kills[0]["i"]
    assert isinstance(killed_member, int)
    # the killed member ran twice (its side effect is at least once) ...
    assert member_runs(view, killed_member) == 2, executions(view)
    assert all(member_runs(view, i) >= 1 for i in range(HEADER)), executions(view)
    # ... and the body exactly once, with every result in header order
    assert body_runs(view) == [expected], executions(view)
    assert final is not None
    assert final.state is State.SUCCESS
    assert final.value == sum(expected)


async def test_the_step_after_a_chord_body_runs_when_the_bodys_worker_dies_before_sending_it(
        namespace: str, tmp_path: Path) -> None:
    """The body's result is stored, the next chain step not yet published, when
    the body's worker dies: the body's delivery comes back, is skipped as a
    duplicate, and sends the next step (regression test of a fixed bug)."""
    view, final, pool = await run_with_a_kill("redis", "after_body_stored", namespace, tmp_path,
                                              then_after=True)
    expected = [i * 7 for i in range(HEADER)]
    assert [k["where"] for k in view.by_kind["KILL_SELF"]] == ["after_body_stored"]
    assert "skipping a duplicate of a task that ran already" in pool.logs(500)
    assert body_runs(view) == [expected], executions(view)
    assert [r["total"] for r in view.by_kind["AFTER"]] == [sum(expected)], executions(view)
    assert final is not None
    assert final.value == sum(expected) + 1


async def test_a_chord_body_whose_worker_dies_mid_run_runs_again_promptly(
        namespace: str, tmp_path: Path) -> None:
    """The body's worker dies in the middle of the body: its claim lapses within
    a few seconds and the body runs again (at least once: the killed run and the
    one that completes), rather than minutes later (regression test)."""
    view, final, _ = await run_with_a_kill("redis", "body_started", namespace, tmp_path,
                                           wait_s=RERUN_S)
    expected = [i * 7 for i in range(HEADER)]
    assert [k["where"] for k in view.by_kind["KILL_SELF"]] == ["body_started"]
    assert body_runs(view) == [expected, expected], executions(view)
    assert final is not None
    assert final.value == sum(expected)


async def test_a_member_redelivered_after_the_claim_lease_does_not_run_the_body_again(
        namespace: str, tmp_path: Path) -> None:
    """As ``body_published`` above, with a broker lease (8 s) longer than the
    worker's claim lease (6 s), as with the default Redis lease of 30 s: the
    killed member comes back after the body finished and its claim lapsed."""
    view, final, _ = await run_with_a_kill("redis", "body_published", namespace, tmp_path,
                                           lease_s=LATE_LEASE_S)
    expected = [i * 7 for i in range(HEADER)]
    kills = view.by_kind["KILL_SELF"]
    assert [k["where"] for k in kills] == ["body_published"]
    assert member_runs(view, kills[0]["i"]) == 2, executions(view)
    assert final is not None
    assert final.value == sum(expected)
    assert body_runs(view) == [expected], executions(view)  # fails: the body ran twice
