"""RELIABILITY.md row G1 (a producer clock 10 min off the worker's) on the Redis
broker, with the skew made for real: the producer is a subprocess run under
libfaketime (``faketime -f +10m`` / ``-10m``: its ``time.time()``, hence every
``datetime.now()``, is 10 min off), while the worker, redis-server and this test
run on the real clock.

The semantics asserted (see ``test_server_rows_delays.py`` for how they are built):

- ``eta=`` given as the producer's ``datetime.now(UTC) + 5 s`` becomes a relative
  delay on the producer's clock; the broker scores it on Redis's ``TIME`` + delay.
  So the task runs about 5 s after it was sent by the real clock, never early and
  not 10 min late (a design that put the absolute ETA on the wire would run it
  10 min late at +10m, and at once, 5 s early, at -10m).
- The producer logs the broker's warning that its clock is more than 5 s off
  Redis ``TIME``, with the skew.
- ``expires`` is an absolute time (the producer's clock + expires) checked on the
  worker's clock: a producer 10 min slow that enqueues with ``expires=60`` has
  its task discarded as expired at once, unrun (REVOKED, reason ``expired``),
  while the same task enqueued from the real clock runs. (A producer 10 min fast
  would give it 11 min instead of 1.) Changing that needs a relative TTL on the
  wire; this test then has to change with it.

The producer's code is :func:`produce`, run as ``python -c`` in the subprocess;
its structlog output (JSON lines on stderr) is what the test reads.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import structlog

from runtime.messages import State
from tests.conftest import require_tool
from tests.faults.app import WORK, build
from tests.faults.harness import (
    REPO_ROOT,
    RedisServer,
    WorkerPool,
    describe,
    results_of,
    wait_for_ledger,
    worker_env,
)
from tests.faults.ledger import Ledger, check

# a task waits ~5 s, the producer starts in a few, worker teardown takes up to 15
pytestmark = [pytest.mark.fault, pytest.mark.redis, pytest.mark.timeout(300)]

QUEUE = "default"
SKEW_S = 600
DELAY_S = 5.0
EXPIRES_S = 60.0
WARNING = "clock is off Redis's clock"
#: How long the task may take to run after it was sent. Generous for a loaded
#: 2-core machine (a CPU burner and the suite beside it, coverage on: a worker
#: starts in up to ~10 s there), and far below the 600 s a skew-sensitive design
#: would take at +10m: passing within it is the "not 10 min late" assertion.
RUN_WITHIN_S = 120.0
#: Starting Python and the runtime under LD_PRELOAD on that loaded machine.
PRODUCER_WITHIN_S = 60.0


def produce(broker: str, results: str, namespace: str, mode: str) -> None:
    """The producer (run under faketime): ``eta`` enqueues ``clk-eta`` due at
    its ``datetime.now(UTC) + DELAY_S``; ``expires`` enqueues ``clk-exp`` with
    ``expires=EXPIRES_S`` and ``clk-ctl`` without. Logs what it saw as JSON."""
    import redis.asyncio as aredis

    from runtime.logs import configure_logging

    configure_logging("INFO", json=True)
    log = structlog.get_logger("faults.clock")

    async def main() -> None:
        rt = build(broker, results=results, namespace=namespace)
        raw = aredis.Redis.from_url(broker)
        async with rt:
            before = await raw.time()
            clock = datetime.now(UTC)
            if mode == "eta":
                await rt.enqueue(rt.signature(WORK, "clk-eta", 0.0), task_id="clk-eta",
                                 eta=clock + timedelta(seconds=DELAY_S))
            else:
                await rt.enqueue(rt.signature(WORK, "clk-exp", 0.0), task_id="clk-exp",
                                 expires=EXPIRES_S)
                await rt.enqueue(rt.signature(WORK, "clk-ctl", 0.0), task_id="clk-ctl")
            after = await raw.time()
            key = rt.broker._queue(QUEUE).delayed  # type: ignore[attr-defined]
            delayed = cast(list[tuple[bytes, float]],
                           await raw.zrange(key, 0, -1, withscores=True))
        await raw.aclose()
        log.info("enqueued", clock_ms=clock.timestamp() * 1000,
                 redis_before_ms=before[0] * 1000 + before[1] / 1000,
                 redis_after_ms=after[0] * 1000 + after[1] / 1000,
                 delayed=[[m.decode(errors="replace"), s] for m, s in delayed])

    anyio.run(main)


async def _run_producer(skew: str, redis_server: RedisServer, namespace: str,
                        mode: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run :func:`produce` under ``faketime -f skew``; its log lines (the
    ``enqueued`` one first) and the clock warnings among them."""
    faketime = require_tool("faketime", "apt-get install -y faketime")
    code = ("import sys; from tests.faults.test_server_rows_clock import produce; "
            "produce(*sys.argv[1:])")
    # the wall clock only: a monotonic clock is not what NTP skew moves
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONUNBUFFERED": "1"}
    with anyio.fail_after(PRODUCER_WITHIN_S):
        done = await anyio.run_process(
            [faketime, "-f", skew, sys.executable, "-c", code, redis_server.url,
             redis_server.url, namespace, mode], cwd=REPO_ROOT, env=env, check=False)
    out = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"producer exited with {done.returncode}:\n{out}"
    lines = []
    for line in out.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    [enqueued] = [e for e in lines if e.get("event") == "enqueued"]
    warnings = [e for e in lines if WARNING in str(e.get("event"))]
    return enqueued, warnings


def _assert_skewed(skew: str, enqueued: dict[str, Any], warnings: list[dict[str, Any]]) -> None:
    sign = 1 if skew.startswith("+") else -1
    # faketime took: the producer's clock is 10 min off Redis's (the real one) ...
    off_s = (enqueued["clock_ms"] - enqueued["redis_before_ms"]) / 1000
    assert abs(off_s - sign * SKEW_S) < 10, off_s
    # ... and the broker told it so at connect, with the skew
    assert warnings, "no clock-skew warning in the producer's log"
    assert warnings[0]["level"] == "warning"
    assert abs(float(warnings[0]["skew_s"]) - sign * SKEW_S) < 10, warnings[0]


@pytest.mark.parametrize("skew", ["+10m", "-10m"])
async def test_an_eta_from_a_producer_clock_10_min_off_runs_after_its_delay_on_the_real_clock(
    skew: str, redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    env = worker_env(broker=redis_server.url, results=redis_server.url, namespace=namespace,
                     ledger=ledger)
    log = ledger.writer("test")
    rt = build(redis_server.url, results=redis_server.url, namespace=namespace)
    async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                              concurrency=2) as pool:
        enqueued, warnings = await _run_producer(skew, redis_server, namespace, "eta")
        view = await wait_for_ledger(
            ledger, lambda v: "clk-eta" in v.done(), timeout=RUN_WITHIN_S,
            what=f"the task due {DELAY_S:g}s after it was sent to run (a skew-sensitive "
                 f"design would run it {SKEW_S}s late)",
            describe=describe(pool.logs, lambda: check(ledger.read()).summary()))
        [result] = (await results_of(rt, ["clk-eta"], timeout=20)).values()
    log.close()
    _assert_skewed(skew, enqueued, warnings)
    # the delay, not the producer's absolute eta, is scored, on Redis's clock
    [[member, score]] = enqueued["delayed"]
    assert "clk-eta" in member
    lo = enqueued["redis_before_ms"] + DELAY_S * 1000
    hi = enqueued["redis_after_ms"] + DELAY_S * 1000
    # (below: the countdown, taken from the eta a moment after it was read; above:
    # three roundings up to whole ms, of the eta, the delay and Redis TIME)
    assert lo - 1000 <= score <= hi + 5, (lo, score, hi)
    # it ran once, not before it was due (worker and Redis share the real clock):
    # not before its score, so not before the delay after it was sent
    assert result.state is State.SUCCESS
    assert result.started_ms is not None, result
    assert result.started_ms >= score - 1, (result, score)
    assert result.started_ms >= lo - 1000, (result, lo)
    report = check(view)
    assert not report.dup_exec and not report.lost, report.summary()
    # the worker, on the real clock, saw no skew
    assert WARNING not in pool.logs(lines=10_000)


async def test_expires_from_a_producer_clock_10_min_slow_is_already_past_on_the_worker(
    redis_server: RedisServer, ledger: Ledger, namespace: str, tmp_path: Path
) -> None:
    env = worker_env(broker=redis_server.url, results=redis_server.url, namespace=namespace,
                     ledger=ledger)
    log = ledger.writer("test")
    rt = build(redis_server.url, results=redis_server.url, namespace=namespace)
    async with rt, WorkerPool(env=env, log_dir=tmp_path / "logs", ledger=log, count=1,
                              concurrency=2) as pool:
        enqueued, warnings = await _run_producer("-10m", redis_server, namespace, "expires")
        # the same task and expiry, sent from the real clock
        await rt.enqueue(rt.signature(WORK, "real-exp", 0.0), task_id="real-exp",
                         expires=EXPIRES_S)
        results = await results_of(rt, ["clk-exp", "clk-ctl", "real-exp"], timeout=RUN_WITHIN_S)
        view = await wait_for_ledger(
            ledger, lambda v: {"clk-ctl", "real-exp"} <= v.done(), timeout=20,
            what="the control tasks to end in the ledger",
            describe=describe(pool.logs, lambda: check(ledger.read()).summary()))
    log.close()
    _assert_skewed("-10m", enqueued, warnings)
    # expires_ms = the producer's clock + 60 s = 9 min in the worker's past: discarded
    expired = results["clk-exp"]
    assert expired.state is State.REVOKED, expired
    assert expired.error is not None and expired.error.reason == "expired", expired
    assert "clk-exp" not in view.ids("START")
    # the slow producer's tasks do run, and so does the same expiry from the real clock
    assert results["clk-ctl"].state is State.SUCCESS
    assert results["real-exp"].state is State.SUCCESS
