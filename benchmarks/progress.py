"""Progress benchmark: the per-call cost of ``ctx.progress()`` in a tight loop.

    .venv/bin/python -m benchmarks.progress                 # 100,000 calls, memory and Redis
    .venv/bin/python -m benchmarks.progress --calls 1000 --no-redis

One async task, run by an embedded worker, awaits ``ctx.progress(i + 1,
total=calls)`` ``calls`` times in a loop; the loop is timed inside the task
body (so enqueue, start-up and the outcome's write are not counted). The same
loop with a bare ``anyio.lowlevel.checkpoint_if_cancelled()`` instead of the
progress call gives the loop's own cost, so "overhead" is what progress adds.
"writes" counts the result store's ``put_many`` calls (the worker's coalesced
STARTED/progress writes) while the task ran: never one per call. A "tight"
loop awaits nothing else, so the worker's writer never runs during it (0
writes: the last progress is stored with the outcome); a "yields" loop also
awaits ``anyio.sleep(0)`` each step, letting the writer run between steps,
so the writes show the coalescing (at most one in flight at a time).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import anyio
import anyio.lowlevel

from runtime import Runtime, current_task
from runtime.errors import ConnectionFailed
from runtime.messages import Result

REDIS_URL = os.environ.get("TASKLOOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class Row:
    store: str
    loop: str  # "tight" (no other await) or "yields" (anyio.sleep(0) each step)
    calls: int
    total_s: float  # the loop of progress calls, measured inside the task
    baseline_s: float  # the same loop with a bare checkpoint
    writes: int  # put_many calls while the task ran
    records: int  # STARTED/progress records in them
    stored_done: float | None  # the progress stored with the outcome

    @property
    def us_per_call(self) -> float:
        return self.total_s / self.calls * 1e6

    @property
    def overhead_us_per_call(self) -> float:
        return (self.total_s - self.baseline_s) / self.calls * 1e6


def _count_writes(rt: Runtime) -> list[int]:
    """Wrap the result store's ``put_many`` (the worker's STARTED/progress
    writes) to count calls and records: ``[calls, records]``."""
    counts = [0, 0]
    store: Any = rt.results
    inner = store.put_many

    async def put_many(results: Sequence[Result], *args: Any, **kwargs: Any) -> Any:
        counts[0] += 1
        counts[1] += len(results)
        return await inner(results, *args, **kwargs)

    store.put_many = put_many
    return counts


async def measure(store: str, calls: int, *, yields: bool = False,
                  redis_url: str = REDIS_URL) -> Row:
    """Run the loop once on ``store`` ("memory" or "redis"); with ``yields``,
    each step also awaits ``anyio.sleep(0)`` (a loop that lets the worker's
    writer run between steps, as real work with I/O does)."""
    namespace = f"bp{uuid.uuid4().hex[:8]}"
    rt = Runtime() if store == "memory" else Runtime(broker=redis_url, namespace=namespace)

    @rt.task(name="bench.progress_loop")
    async def progress_loop(n: int, yields: bool) -> float:
        ctx = current_task()
        start = time.perf_counter()
        for i in range(n):
            await ctx.progress(i + 1, total=n)
            if yields:
                await anyio.sleep(0)
        return time.perf_counter() - start

    @rt.task(name="bench.bare_loop")
    async def bare_loop(n: int, yields: bool) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await anyio.lowlevel.checkpoint_if_cancelled()
            if yields:
                await anyio.sleep(0)
        return time.perf_counter() - start

    try:
        async with rt, rt.worker(concurrency=1):
            baseline_s = await rt.run(bare_loop.s(calls, yields))
            counts = _count_writes(rt)
            handle = await rt.enqueue(progress_loop.s(calls, yields))
            total_s = await handle.result(timeout=600)
            writes, records = counts
            info = await handle.info()
    finally:
        if store != "memory":
            async with rt:
                for part in (rt.broker, rt.results):
                    purge_namespace = getattr(part, "purge_namespace", None)
                    if purge_namespace is not None:
                        await purge_namespace()
    progress = getattr(info, "progress", None)
    return Row(store=store, loop="yields" if yields else "tight", calls=calls, total_s=total_s,
               baseline_s=baseline_s, writes=writes, records=records,
               stored_done=progress.done if progress is not None else None)


async def _redis_up(redis_url: str) -> bool:
    try:
        async with Runtime(broker=redis_url, namespace=f"bp{uuid.uuid4().hex[:8]}"):
            return True
    except ConnectionFailed:
        return False


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> list[Row]:
    """Measure, print the table (to ``out``, default stdout) and return the rows."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.progress",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=100_000, help="progress calls in the loop")
    parser.add_argument("--no-redis", action="store_true", help="measure the memory store only")
    parser.add_argument("--redis-url", default=REDIS_URL)
    args = parser.parse_args(argv)

    stores = ["memory"]
    notes: list[str] = []
    if not args.no_redis:
        if anyio.run(_redis_up, args.redis_url):
            stores.append("redis")
        else:
            notes.append(f"redis: not reachable at {args.redis_url}; start it or pass --no-redis")
    rows = [anyio.run(functools.partial(measure, store, args.calls, yields=yields,
                                        redis_url=args.redis_url))
            for store in stores for yields in (False, True)]

    from rich.console import Console
    from rich.table import Table

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table(title=f"ctx.progress() in a loop ({os.cpu_count()} CPUs, Python "
                        f"{sys.version.split()[0]}, load average {load})",
                  caption="total: the loop inside the task; overhead: minus the same loop "
                          "with a bare checkpoint (and the same sleep(0)); writes: result-store "
                          "put_many calls (records in them) while the task ran")
    for column in ("store", "loop", "calls", "total s", "µs per call", "overhead µs per call",
                   "writes (records)", "stored done"):
        table.add_column(column)
    for r in rows:
        table.add_row(r.store, r.loop, f"{r.calls:,}", f"{r.total_s:.3f}", f"{r.us_per_call:.2f}",
                      f"{r.overhead_us_per_call:.2f}", f"{r.writes} ({r.records})",
                      f"{r.stored_done:g}" if r.stored_done is not None else "-")
    console = Console(width=160, file=out)
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    return rows


if __name__ == "__main__":
    main()
