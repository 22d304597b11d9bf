"""Row H2: a backlog queued before any worker starts, then drained."""

from __future__ import annotations

import time
from pathlib import Path

from tests.chaos.rows.common import (
    MIB,
    Drained,
    Report,
    drain,
    prequeue,
    server_memory,
    servers,
    settle,
    verdict,
)

__all__ = ["PRODUCER_MAX_MIB", "WORKER_MAX_MIB", "backlog"]

#: RELIABILITY.md row H2's targets
PRODUCER_MAX_MIB = 200
WORKER_MAX_MIB = 150


async def backlog(*, broker: str, queued: int, workers: int, concurrency: int,
                  prefetch: int | None, payload_bytes: int, batch: int, queue_type: str,
                  drain_timeout: float, workdir: Path | None, report: Report) -> bool:
    payload = "x" * payload_bytes
    async with servers(broker, queue_type=queue_type, workdir=workdir,
                       report=report) as s:
        report(f"H2: enqueue {queued} no-op tasks with a {payload_bytes}-byte payload "
               f"(enqueue_many, batches of {batch}) before any worker starts")
        secs, producer_peak = await prequeue(s, lo=0, n=queued, payload=payload, batch=batch,
                                             report=report)
        report(f"queued {queued} in {secs:.1f} s ({queued / secs:.0f}/s); "
               f"producer peak RSS {producer_peak / MIB:.1f} MiB (target < {PRODUCER_MAX_MIB})")
        report("server memory with the backlog queued:\n" + await server_memory(s, expect=queued))
        report(f"H2: starting {workers} workers (concurrency {concurrency}"
               f"{f', prefetch {prefetch}' if prefetch else ''}), draining")
        t_spawn = time.monotonic()
        drained: Drained | None = None
        async with s.pool(workers=workers, concurrency=concurrency, prefetch=prefetch) as pool:
            try:
                drained = await drain(s, pool, lo=0, hi=queued, t_spawn=t_spawn,
                                      timeout=drain_timeout, report=report)
            except AssertionError as e:
                report(f"H2: drain incomplete: {str(e).splitlines()[0]}")
            stuck, dead = await settle(s)
        report("server memory after the drain (results stored):\n"
               + await server_memory(s, expect=0))
        lines, ok = verdict(s, stuck=stuck, dead=dead)
        rss_ok = producer_peak < PRODUCER_MAX_MIB * MIB
        if drained is not None:
            report(f"drain: {queued} tasks in {drained.seconds:.1f} s (first START -> last END) = "
                   f"{drained.rate:.0f} tasks/s; {drained.with_startup_s:.1f} s from the "
                   f"workers' spawn = {queued / drained.with_startup_s:.0f} tasks/s")
            for pid, peak in sorted(drained.worker_peaks.items()):
                report(f"worker {pid} peak RSS {peak / MIB:.1f} MiB (target < {WORKER_MAX_MIB})")
            rss_ok = rss_ok and all(p < WORKER_MAX_MIB * MIB for p in drained.worker_peaks.values())
        report(f"RSS targets (producer < {PRODUCER_MAX_MIB} MiB, each worker < {WORKER_MAX_MIB} "
               f"MiB): {'met' if rss_ok else 'MISSED'}")
        for line in lines:
            report(line)
        s.passed = ok and rss_ok and drained is not None
        report(f"verdict: {'PASS' if s.passed else 'FAIL'}")
        return s.passed
