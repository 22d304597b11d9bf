"""The task bodies every framework runs, and small stdlib helpers for the drivers.

This file is imported inside each framework's own virtual environment, so it
uses the standard library only.
"""

from __future__ import annotations

import math
import os
import time

__all__ = ["burn", "percentile", "rss_kb", "timed_burn"]


def burn(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` rounds of integer arithmetic."""
    x = 0
    for i in range(loops):
        x = (x * 31 + i) % 1_000_003
    return x


def timed_burn(loops: int, rounds: int = 5) -> float:
    """The median CPU seconds ``burn(loops)`` takes in this process (CPU time, so
    that other processes competing for the cores do not inflate it)."""
    took = []
    for _ in range(rounds):
        t0 = time.process_time()
        burn(loops)
        took.append(time.process_time() - t0)
    took.sort()
    return took[len(took) // 2]


def rss_kb() -> int:
    """This process's resident set size now, in KiB (Linux /proc)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except OSError:  # not Linux: the peak from getrusage is still reported
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest-rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
