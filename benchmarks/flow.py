"""The limits workload (issue 16): while tasks wait on a limit, does the worker keep
running other tasks at full speed?

Three drains of ``limits_n`` no-op tasks (60,000: about 4 s) on Redis, each with one worker process
(``taskloom worker --concurrency 100 --prefetch 100``), run by ``harness._limits``:

- ``alone``: the plain app, the throughput workload with ``limits_n`` tasks;
- ``rate``: first ``limits_m`` tasks of a task with ``rate_limit=limits_rate`` are queued
  on a queue of their own ("limited", consumed by the same worker), then the no-ops;
- ``conc``: the same with a task of ``concurrency_limit=limits_concurrency`` per key
  (``limits_keys`` keys, each run holding its permit ``limits_hold_s``).

The no-op rate is measured as in the throughput workload (from the first completion
seen to the last, from the no-op queue's stats); the worker is kept running until
``limits_observe_s`` after its start (or the no-ops' end, if later), then the limited
tasks' ledger (a Redis list they append to, see ``apps/taskloom_app.py``) gives how many
ran, at what rate, and (concurrency) how many overlapped per key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aredis

if TYPE_CHECKING:
    from benchmarks.config import Params

__all__ = ["KINDS", "Entry", "Window", "figures", "ledger_key", "parse_ledger", "read_ledger"]

#: the runs of one measurement, in order: the figure prefix of each
KINDS = ("alone", "rate", "conc")


@dataclass(frozen=True)
class Window:
    """Epoch seconds of one run: the worker's start, the first and last no-op
    completions seen, and when the observation ended (the worker still running)."""

    spawn: float
    first: float
    last: float
    end: float


@dataclass(frozen=True)
class Entry:
    """One run of a limited task: its key ("rate" for the rate-limited task), its
    start and, for the concurrency-limited task, its end."""

    key: str
    start: float
    end: float | None = None


def ledger_key(namespace: str) -> str:
    """The Redis list the limited tasks append to (``apps/taskloom_app.py``'s LEDGER)."""
    return f"{namespace}:bench:limited-ledger"


def parse_ledger(lines: Sequence[bytes | str]) -> list[Entry]:
    """``"rate START"`` and ``"KEY START END"`` lines into entries."""
    out = []
    for raw in lines:
        parts = (raw.decode() if isinstance(raw, bytes) else raw).split()
        if len(parts) == 2:
            out.append(Entry(parts[0], float(parts[1])))
        elif len(parts) == 3:
            out.append(Entry(parts[0], float(parts[1]), float(parts[2])))
        else:
            raise ValueError(f"a limited task's ledger line is malformed: {raw!r}")
    return out


async def read_ledger(redis_url: str, namespace: str) -> list[Entry]:
    client = aredis.Redis.from_url(redis_url)
    try:
        return parse_ledger(await client.lrange(ledger_key(namespace), 0, -1))
    finally:
        await client.aclose()


async def deferrals(redis_url: str, namespace: str) -> int:
    """How many times the limiter sent a task back to wait, over every key (its stats)."""
    from runtime.ops.limits.store import RedisLimitStore

    store = RedisLimitStore(redis_url, namespace=namespace)
    try:
        return sum(s.deferred for s in await store.snapshot())
    finally:
        await store.aclose()


def _most_in(starts: Sequence[float], span_s: float) -> int:
    """The most starts in any half-open window of ``span_s`` seconds."""
    most, lo = 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] >= span_s:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def _peak_overlap(entries: Sequence[Entry]) -> int:
    """The most runs of one key overlapping at any moment (an end before a start at a tie)."""
    peak = 0
    for key in {e.key for e in entries}:
        events = sorted([(e.start, 1) for e in entries if e.key == key]
                        + [(e.end, -1) for e in entries if e.key == key and e.end is not None])
        running = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
    return peak


def figures(kind: str, entries: Sequence[Entry], window: Window) -> dict[str, float]:
    """The limited tasks' figures of one run, prefixed with ``kind`` ("rate" or "conc"):
    how many ran while the no-ops drained and in the whole observed window, their
    observed rate (runs after the first ÷ the time from the first start to the last),
    and the most starts in 1 s (rate) or the peak running per key (concurrency)."""
    starts = sorted(e.start for e in entries)
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    out = {
        f"{kind}_ran": float(len(starts)),
        f"{kind}_ran_during": float(sum(1 for s in starts if window.spawn <= s <= window.last)),
        f"{kind}_observed_per_s": (len(starts) - 1) / span if span > 0 else 0.0,
        f"{kind}_observed_s": window.end - window.spawn,
    }
    if kind == "rate":
        out["rate_max_1s"] = float(_most_in(starts, 1.0))
    else:
        out["conc_peak"] = float(_peak_overlap(entries))
    return out


# -- python -m benchmarks.flow: the limits drains alone, repeated, with worker CPU per task ------

#: the runs ``main`` knows: the three of ``KINDS``, and "gate": the limits app (its
#: LimitsGate installed) with no limited task queued, which isolates what the gate
#: costs every no-op from what the waiting tasks cost
PROBE_KINDS = (*KINDS, "gate")


async def _probe_run(kind: str, namespace: str, params: Params) -> dict[str, float]:
    """One drain of ``kind`` (see ``PROBE_KINDS``) under ``namespace``: the no-op rate
    and the worker's CPU per no-op (µs), and for "rate"/"conc" the limited tasks'
    figures."""
    import os
    import time

    import anyio

    from benchmarks import harness
    from benchmarks.config import Servers
    from benchmarks.frameworks import RunContext, make_frameworks

    fw = make_frameworks(["taskloom"])[0]
    servers = Servers(redis_url=os.environ.get("TASKLOOM_BENCH_REDIS_URL",
                                               "redis://127.0.0.1:6379/0"))
    workload = "throughput" if kind == "alone" else "limits"
    ctx = RunContext(workload=workload, broker="redis", namespace=namespace, servers=servers,
                     params=params)
    await anyio.to_thread.run_sync(fw.prepare, ctx)
    try:
        seen: list[Window] = []
        after = None
        if kind in ("rate", "conc"):
            await harness.run_driver(fw, ctx, "enqueue_limited",
                                     {"kind": kind, "m": params.limits_m,
                                      "keys": params.limits_keys, "hold_s": params.limits_hold_s})

            async def observe(spawn: float, first: float, last: float) -> None:
                await anyio.sleep(max(0.0, spawn + params.limits_observe_s - time.time()))
                seen.append(Window(spawn, first, last, time.time()))

            after = observe
        drained = await harness._drain(fw, ctx, drain=True, cpu_task_s=0.0, after=after)
        out = {"per_s": drained["tasks_per_s"], "cpu_us": drained["cpu_us_per_task"]}
        if seen:
            out.update(figures(kind, await read_ledger(servers.redis_url, namespace), seen[0]))
            out[f"{kind}_deferrals"] = float(await deferrals(servers.redis_url, namespace))
        return out
    finally:
        await anyio.to_thread.run_sync(fw.cleanup, ctx)


def main(argv: Sequence[str] | None = None) -> None:
    """Print, per repeat, each run's no-op rate, its ratio to the same repeat's drain
    alone, the worker CPU per no-op and the load average; then medians (min-max)."""
    import argparse
    import os
    import secrets
    import statistics

    import anyio

    from benchmarks.config import Params

    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow", description=main.__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(PROBE_KINDS)} ('alone' first)")
    parser.add_argument("--observe", type=float, default=None,
                        help="seconds to watch the limited tasks (default Params')")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or kinds[0] != "alone" or set(kinds) - set(PROBE_KINDS):
        parser.error(f"--kinds must start with 'alone' and name only {PROBE_KINDS}")
    params = Params()
    if args.observe is not None:
        params = dataclasses.replace(params, limits_observe_s=args.observe)
    suite = secrets.token_hex(3)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for repeat in range(1, args.repeat + 1):
        alone = 0.0
        for kind in kinds:
            load = os.getloadavg()[0]
            got = anyio.run(_probe_run, kind, f"tlf{suite}-{kind[0]}{repeat}", params,
                            backend_options={"use_uvloop": True})
            alone = got["per_s"] if kind == "alone" else alone
            got["ratio"] = got["per_s"] / alone
            got["load"] = load
            rows[kind].append(got)
            extra = "".join(f" {k}={v:.4g}" for k, v in got.items()
                            if k.startswith(kind) and k.endswith(("_ran", "_per_s", "max_1s",
                                                                  "peak", "deferrals")))
            print(f"[{repeat}] {kind:5} {got['per_s']:8,.0f}/s ratio {got['ratio']:.2f} "
                  f"cpu {got['cpu_us']:6.1f} us/task load {load:.1f}{extra}", flush=True)
    print("median (min-max) over the repeats:")
    for kind in kinds:
        for name in ("ratio", "per_s", "cpu_us", "load"):
            vals = [r[name] for r in rows[kind]]
            print(f"  {kind:5} {name:6} {statistics.median(vals):9.3f} "
                  f"({min(vals):.3f}-{max(vals):.3f})")


if __name__ == "__main__":
    main()
