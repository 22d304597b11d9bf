"""The limits workload (issue 16): while tasks wait on a limit, does the worker keep
running other tasks at full speed?

Three drains of ``throughput_n`` no-op tasks on Redis, each with one worker process
(``taskloom worker --concurrency 100 --prefetch 100``), run by ``harness._limits``:

- ``alone``: the plain app, exactly the throughput workload;
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

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aredis

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
