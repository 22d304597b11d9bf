"""Flow control end to end, as a user writes it: ``@rt.task(rate_limit=...,
unique_for=..., debounce=...)``, ``.set(rate_limit=...)``,
``enqueue_many(rate=...)``, on memory and Redis, and the issue's
cross-process row with real ``taskloom worker`` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from runtime import ConfigError, EnqueueError, Middleware, Runtime, State
from runtime.messages import HEADER_CONCURRENCY as CORE_CONCURRENCY
from runtime.messages import HEADER_RATE as CORE_RATE
from runtime.messages import TaskMessage
from runtime.ops.limits import HEADER_CONCURRENCY, HEADER_RATE, LimitsGate, parse_rate
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def rt(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Runtime]:
    if request.param == "memory":
        yield Runtime()
        return
    yield Runtime(broker=REDIS_URL, namespace=namespace)


def _worst_window(starts: list[float]) -> int:
    return max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)


# -- the decorator -----------------------------------------------------------------------


def test_the_decorator_validates_and_keeps_the_limits() -> None:
    rt = Runtime()

    @rt.task(name="plain")
    async def plain(x: int) -> None: ...

    @rt.task(name="send", rate_limit="5/m", rate_key="user_id")
    async def send(user_id: str) -> None: ...

    assert plain.limits is None
    assert send.limits is not None and str(send.limits.rate) == "5/m"
    with pytest.raises(ConfigError, match="not a rate"):
        rt.task(name="bad", rate_limit="fast")(plain.fn)
    with pytest.raises(ConfigError, match="names no argument"):
        rt.task(name="bad2", concurrency_limit=2, concurrency_key="tenant")(plain.fn)
    with pytest.raises(ConfigError, match="contradict"):
        rt.task(name="bad3", unique_for=5, debounce=5)(plain.fn)
    with pytest.raises(ConfigError, match="without schedule"):
        rt.task(name="bad4", misfire="run_all")(plain.fn)


async def test_unlimited_tasks_install_no_gate() -> None:
    rt = Runtime()

    @rt.task(name="plain")
    async def plain(x: int) -> None: ...

    @rt.task(name="once", unique_for=timedelta(minutes=1))
    async def once(x: int) -> None: ...  # dedup is at enqueue: no gate either

    async with rt, rt.worker():
        assert rt.gates == []


async def test_a_decorated_rate_limit_holds_through_a_worker(rt: Runtime) -> None:
    starts: list[float] = []

    @rt.task(name="api", rate_limit="20/s")
    async def api(n: int) -> None:
        starts.append(time.monotonic())

    async with rt:
        await rt.enqueue_many([api.s(n) for n in range(40)])
        async with rt.worker(concurrency=20) as worker:
            assert [type(g) for g in rt.gates] == [LimitsGate]
            with anyio.fail_after(60):  # generous: 40 starts at 20/s take 2 s
                while len(starts) < 40:
                    await anyio.sleep(0.05)
    assert worker.deferred > 0
    assert _worst_window(starts) <= parse_rate("20/s").window_max


async def test_a_burst_of_1000_unique_enqueues_runs_once(rt: Runtime) -> None:
    runs: list[str] = []

    @rt.task(name="index", unique_for=timedelta(minutes=5), unique_key="doc_id")
    async def index(doc_id: str) -> None:
        runs.append(doc_id)

    async with rt:
        handles = []

        async def one() -> None:
            handles.append(await rt.enqueue(index.s("doc-1")))

        async with anyio.create_task_group() as tg:
            for _ in range(1000):
                tg.start_soon(one)
        first = [h for h in handles if not h.duplicate]
        assert len(first) == 1 and len(handles) == 1000
        assert {h.id for h in handles} == {first[0].id}
        other = await rt.enqueue(index.s("doc-2"))  # another key is not a duplicate
        assert not other.duplicate
        async with rt.worker():
            with anyio.fail_after(30):  # generous: two tasks
                await first[0].result()
                await other.result()
                await anyio.sleep(0.2)  # nothing else was published: give a stray time to show
    assert sorted(runs) == ["doc-1", "doc-2"]


async def test_a_debounced_burst_runs_its_last_call() -> None:
    rt = Runtime()
    runs: list[int] = []

    @rt.task(name="save", debounce=timedelta(seconds=0.5), debounce_key="doc_id")
    async def save(doc_id: str, n: int) -> None:
        runs.append(n)

    async with rt, rt.worker():
        handles = [await rt.enqueue(save.s("d", n)) for n in range(20)]
        with anyio.fail_after(30):  # generous: a 0.5 s quiet period
            await handles[-1].result()
            for h in handles[:-1]:
                while (await h.status()) is not State.REVOKED:
                    await anyio.sleep(0.05)
    assert runs == [19]


class Capture(Middleware):
    def __init__(self) -> None:
        self.sent: dict[str, TaskMessage] = {}

    def before_publish(self, message: TaskMessage) -> TaskMessage:
        self.sent[message.id] = message
        return message


async def test_per_call_limits_ride_in_headers() -> None:
    capture = Capture()
    rt = Runtime(middleware=[capture])

    @rt.task(name="api")
    async def api(n: int) -> None: ...

    assert (HEADER_RATE, HEADER_CONCURRENCY) == (CORE_RATE, CORE_CONCURRENCY)
    sig = api.s(1).set(rate_limit="2/s", concurrency_limit=3)
    async with rt:
        handle = await rt.enqueue(sig)
        gate = LimitsGate(rt)
        check = await gate.check_for(capture.sent[handle.id])
        assert check is not None and check.limit == 3 and check.interval_ms == 500
        plain = await rt.enqueue(api.s(2))
        assert capture.sent[plain.id].headers == {}  # nothing more on the wire
        assert await gate.check_for(capture.sent[plain.id]) is None
    with pytest.raises(ConfigError, match="not a rate"):
        api.s(1).set(rate_limit="quick")
    with pytest.raises(ConfigError, match="concurrency_limit"):
        api.s(1).set(concurrency_limit=0)


async def test_enqueue_many_with_a_rate_paces_the_batch() -> None:
    capture = Capture()
    rt = Runtime(middleware=[capture])
    at: list[float] = []

    @rt.task(name="noop")
    async def noop(n: int) -> None: ...

    class Stamp(Capture):
        def before_publish(self, message: TaskMessage) -> TaskMessage:
            at.append(time.monotonic())
            return message

    rt.middleware.append(Stamp())
    rt._publish_hooks.append(rt.middleware[-1])
    async with rt:
        handles = await rt.enqueue_many([noop.s(n) for n in range(30)], rate="50/s")
    assert len(handles) == 30 and len(set(h.id for h in handles)) == 30
    # 30 at 50/s with a burst of 5: the last batch leaves at least 0.4 s after the first
    assert at[-1] - at[0] >= 0.4


async def test_per_call_retention_is_kept_over_the_tasks(rt: Runtime) -> None:
    @rt.task(name="keep", result_ttl=3600, failure_ttl=3600)
    async def keep(fail: bool) -> int:
        if fail:
            raise ValueError("no")
        return 1

    async with rt, rt.worker():
        ok = await rt.enqueue(keep.s(False).set(result_ttl=7))
        bad = await rt.enqueue(keep.s(True).set(failure_ttl=9))
        default = await rt.enqueue(keep.s(False))
        with anyio.fail_after(30):  # generous: three tasks
            for h in (ok, bad, default):
                with contextlib.suppress(Exception):
                    await h.result()
        stored = {h: await rt.results.get(h.id) for h in (ok, bad, default)}
    assert stored[ok] is not None and stored[ok].ttl_s == 7
    assert stored[bad] is not None and stored[bad].ttl_s == 9
    assert stored[default] is not None and stored[default].ttl_s == 3600
    with pytest.raises(EnqueueError, match="result_ttl"):
        keep.s(False).set(result_ttl=-1)


# -- the cross-process row: real `taskloom worker` processes ----------------------


@pytest.mark.redis
@pytest.mark.slow
async def test_three_cli_workers_hold_a_decorated_rate(tmp_path: Path, namespace: str) -> None:
    from tests.limits.e2e_app import RATE, api

    ledger = tmp_path / "starts.txt"
    env = {**os.environ, "LIMITS_NS": namespace, "LIMITS_LEDGER": str(ledger),
           "PYTHONPATH": str(ROOT)}
    producer = Runtime(broker=REDIS_URL, namespace=namespace)  # on the workers' namespace
    producer.registry.add(api)
    workers = [subprocess.Popen([sys.executable, "-m", "runtime.cli", "worker",
                                 "tests.limits.e2e_app:rt", "--concurrency", "50"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for _ in range(3)]
    try:
        async with producer:
            await producer.enqueue_many([api.s(n) for n in range(600)])
            # generous: 600 starts at 20/s take 30 s; slow shared machines take longer
            with anyio.fail_after(180):
                while not ledger.exists() or len(ledger.read_text().splitlines()) < 600:
                    await anyio.sleep(0.5)
            await anyio.sleep(1.0)  # a start beyond 600 would be a double run
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    rows = [line.split() for line in ledger.read_text().splitlines()]
    assert sorted(int(n) for _, n in rows) == list(range(600))
    starts = sorted(float(t) for t, _ in rows)
    r = parse_rate(RATE)
    measured = (len(starts) - 1) / (starts[-1] - starts[0])
    assert abs(measured - r.count) <= 0.05 * r.count, measured
    # the limiter's documented bound for any window of one period: count + burst
    assert _worst_window(starts) <= r.window_max
