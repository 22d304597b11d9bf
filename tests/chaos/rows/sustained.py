"""Row H1: a steady rate of no-op tasks for N minutes, no faults."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from brokers.base import BrokerError
from runtime import Signature
from tests.chaos.rows.app import NOOP
from tests.chaos.rows.common import (
    Report,
    Setup,
    drain,
    prequeue,
    servers,
    settle,
    verdict,
    warm_up,
)
from tests.chaos.rows.tally import Tally, key, quantile
from tests.faults.harness import Producer, wait_until

__all__ = ["P99_MAX_MS", "sustained"]

#: RELIABILITY.md row H1: p99 enqueue -> start below this at 50 % of the max rate
P99_MAX_MS = 250.0
#: a minute's line is printed this long after it ends (its last tasks start)
LAG_S = 2.0


def minute_line(tally: Tally, m: int, bounds: list[int]) -> str:
    lo, hi = bounds[m], bounds[m + 1]
    lat = tally.latencies_ms(lo, hi)
    waiting = sum(tally.ok[lo:hi]) - len(lat)
    p50, p99 = quantile(list(lat), 0.5), quantile(lat, 0.99)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    return (f"minute {m + 1}: enqueued {sum(tally.ok[lo:hi])}  completed "
            f"{tally.done_per_minute[m]}  enqueue->start p50 {ms(p50)} ms  p99 {ms(p99)} ms"
            + (f"  (not started yet: {waiting})" if waiting else ""))


async def load(s: Setup, *, rate: float, minutes: float, lanes: int, lo: int,
               task_ids: bool, report: Report) -> tuple[list[int], float]:
    """``lanes`` paced producers enqueue ids from ``lo`` on at ``rate`` in all
    for ``minutes``; a minute's line is printed as it closes. Returns the
    first id of each minute (and the end) and the load's seconds."""
    producer = Producer(s.rt, s.writer, max_tries=10) if task_ids else None
    counter = lo
    bounds = [lo]
    t0 = s.tally.t0 = time.monotonic()
    end_at = t0 + minutes * 60

    async def one(k: str, sig: Signature) -> None:
        if producer is not None:  # idempotent ids, retried (tests.faults.harness)
            await producer.enqueue(k, sig)
            return
        s.writer.write("ENQ_SENT", id=k)
        try:
            await s.rt.enqueue(sig)
        except BrokerError as e:
            s.writer.write("ENQ_INDET", id=k, err=f"{type(e).__name__}: {e}"[:300])
            return
        s.writer.write("ENQ_OK", id=k)

    async def lane() -> None:
        nonlocal counter
        period = lanes / rate
        next_at = time.monotonic()
        while time.monotonic() < end_at:
            k = key(counter)
            counter += 1
            await one(k, s.rt.signature(NOOP, k, ""))
            next_at += period
            await anyio.sleep(max(0.0, next_at - time.monotonic()))  # pacing of the load

    async def monitor() -> None:
        printed = 0
        while True:
            await anyio.sleep(0.5)  # the ledger is tailed twice a second
            s.tally.update(s.tail)
            now = time.monotonic()
            if now >= t0 + 60 * len(bounds) and now < end_at:
                bounds.append(counter)
            if len(bounds) > printed + 1 and now >= t0 + 60 * (printed + 1) + LAG_S:
                report("  live " + minute_line(s.tally, printed, bounds))
                printed += 1

    async with anyio.create_task_group() as outer:
        outer.start_soon(monitor)
        async with anyio.create_task_group() as tg:
            for _ in range(lanes):
                tg.start_soon(lane)
        outer.cancel_scope.cancel()
    load_s = time.monotonic() - t0
    if bounds[-1] != counter:
        bounds.append(counter)
    return bounds, load_s


async def sustained(*, broker: str, minutes: float, rate: str, workers: int, concurrency: int,
                    prefetch: int | None, lanes: int, find_max: int, task_ids: bool,
                    queue_type: str, drain_timeout: float, workdir: Path | None,
                    report: Report) -> bool:
    async with servers(broker, queue_type=queue_type, workdir=workdir, report=report) as s:
        max_rate: float | None = None
        if find_max:
            report(f"H1: --find-max: {find_max} no-op tasks queued before the workers start")
            await prequeue(s, lo=0, n=find_max, payload="", batch=1000, report=report)
        t_spawn = time.monotonic()
        async with s.pool(workers=workers, concurrency=concurrency, prefetch=prefetch) as pool:
            if find_max:
                d = await drain(s, pool, lo=0, hi=find_max, t_spawn=t_spawn,
                                timeout=drain_timeout, report=report)
                max_rate = d.rate
                report(f"max drain rate: {d.rate:.0f} tasks/s ({find_max} tasks in "
                       f"{d.seconds:.1f} s, first START -> last END); 50% = {d.rate / 2:.0f}/s")
            if rate == "auto":
                if max_rate is None:
                    raise SystemExit("--rate auto needs --find-max N")
                target = max_rate / 2
            else:
                target = float(rate)
            lo = await warm_up(s, pool, lo=find_max)
            report(f"H1: workers warm ({lo - find_max} warm-up tasks ran, every worker ran one)")
            report(f"H1: {target:.0f} tasks/s for {minutes:g} min from {lanes} lanes"
                   + (f" ({100 * target / max_rate:.0f}% of the max drain rate)"
                      if max_rate else "") + (", idempotent task ids" if task_ids else ""))
            bounds, load_s = await load(s, rate=target, minutes=minutes, lanes=lanes,
                                        lo=lo, task_ids=task_ids, report=report)
            confirmed = sum(s.tally.ok[lo:])
            report(f"H1: load over after {load_s:.1f} s: {bounds[-1] - lo} sent, "
                   f"achieved {confirmed / load_s:.0f} tasks/s; draining")

            async def probe() -> bool:
                s.tally.update(s.tail)
                return s.tally.settled()

            try:
                await wait_until(probe, timeout=drain_timeout, interval=0.5,
                                 what="every confirmed task to end ok")
            except AssertionError as e:
                report(f"H1: drain incomplete: {str(e).splitlines()[0]}")
            stuck, dead = await settle(s)
        report("per minute (final; latency = ENQ_SENT by the producer, before the publish, "
               "-> START written by the task body):")
        for m in range(len(bounds) - 1):
            report("  " + minute_line(s.tally, m, bounds))
        all_lat = s.tally.latencies_ms(lo, bounds[-1])
        p99 = quantile(all_lat, 0.99)
        report(f"whole run: enqueue->start p50 {quantile(list(all_lat), 0.5) or 0:.1f} ms  "
               f"p99 {p99 or 0:.1f} ms (target < {P99_MAX_MS:g} ms at 50% of the max rate"
               + (f"; this run at {100 * target / max_rate:.0f}%" if max_rate else
                  "; max rate not measured: --find-max N") + ")")
        lines, ok = verdict(s, stuck=stuck, dead=dead)
        for line in lines:
            report(line)
        s.passed = ok
        report(f"verdict: {'PASS' if ok else 'FAIL'}")
        return ok
