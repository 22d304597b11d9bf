"""The ledger of a long row, read as it grows and kept in flat arrays.

Row ids are ``r0``, ``r1``, ... (dense), so the tally keeps one slot per id in
``array``/``bytearray`` columns instead of a dict per record: 1,000,000 tasks
cost about 30 MB, where ``Ledger.read()`` would build 4,000,000 dicts. Its
metrics are those of :func:`tests.faults.ledger.check` (lost: ENQ_OK without an
END(ok) and not dead-lettered; duplicated: more than one START; unexpected: an
execution of an id never sent); for small runs the rows also run ``check`` on the
whole ledger and print both (``crosscheck``).
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.faults.ledger import Ledger, check

__all__ = ["PREFIX", "LedgerTail", "Tally", "crosscheck", "key", "quantile"]

PREFIX = "r"
_NAN = float("nan")


def key(i: int) -> str:
    return f"{PREFIX}{i}"


def quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank quantile (as ``tests.chaos._p99``); sorts ``values``."""
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class LedgerTail:
    """The complete records appended to a ledger directory since the last call,
    at most ``chunk`` bytes of each file per call (a 1,000,000-task backlog's
    producer file is ~150 MB: read at once it would hold the loop for seconds)."""

    def __init__(self, directory: Path, chunk: int = 8 * 1024 * 1024) -> None:
        self.dir = directory
        self.chunk = chunk
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}

    def read(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.dir.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(self.chunk)
            if not data:
                continue
            self._offsets[path] = offset + len(data)
            lines = (self._partial.pop(path, b"") + data).split(b"\n")
            if lines[-1]:
                self._partial[path] = lines[-1]  # a record still being written
            for line in lines[:-1]:
                if line:
                    yield json.loads(line)


class Tally:
    """Per id: sent time, confirmed, START count and first START time, END(ok)
    and its time, dead-lettered. ``t0`` buckets confirmations and completions
    per minute."""

    def __init__(self, t0: float = 0.0) -> None:
        self.t0 = t0
        self.sent_t = array("d")
        self.start_t = array("d")
        self.end_t = array("d")
        self.ok = bytearray()
        self.starts = bytearray()  # saturates at 255
        self.done = bytearray()
        self.dlq = bytearray()
        self.ok_count = 0
        self.done_count = 0
        self.dlq_count = 0
        self.indeterminate = 0
        self.foreign: list[str] = []  # ids not of this row (unexpected)
        self.start_pids: set[int] = set()  # the processes that ran a task
        self.ok_per_minute: Counter[int] = Counter()
        self.done_per_minute: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self.ok)

    def _slot(self, task_id: str) -> int | None:
        if not task_id.startswith(PREFIX) or not task_id[1:].isdigit():
            self.foreign.append(task_id)
            return None
        i = int(task_id[1:])
        if i >= len(self.ok):
            more = i + 1 - len(self.ok) + 4096
            for col in (self.sent_t, self.start_t, self.end_t):
                col.extend([_NAN] * more)
            for flags in (self.ok, self.starts, self.done, self.dlq):
                flags.extend(bytes(more))
        return i

    def _minute(self, t: float) -> int:
        return int((t - self.t0) // 60)

    def add(self, r: dict[str, Any]) -> None:
        kind = r["k"]
        if kind not in ("ENQ_SENT", "ENQ_OK", "ENQ_INDET", "START", "END", "DLQ_SEEN"):
            return
        i = self._slot(r["id"])
        if i is None:
            return
        t = r["t"]
        if kind == "ENQ_SENT":
            if math.isnan(self.sent_t[i]):
                self.sent_t[i] = t
        elif kind == "ENQ_OK":
            if not self.ok[i]:
                self.ok[i] = 1
                self.ok_count += 1
                self.ok_per_minute[self._minute(t)] += 1
        elif kind == "ENQ_INDET":
            self.indeterminate += 1
        elif kind == "START":
            self.start_pids.add(r["pid"])
            if self.starts[i] == 0:
                self.start_t[i] = t
            self.starts[i] = min(255, self.starts[i] + 1)
        elif kind == "END":
            if r.get("ok") and not self.done[i]:
                self.done[i] = 1
                self.end_t[i] = t
                self.done_count += 1
                self.done_per_minute[self._minute(t)] += 1
        elif not self.dlq[i]:
            self.dlq[i] = 1
            self.dlq_count += 1

    def update(self, tail: LedgerTail) -> None:
        for r in tail.read():
            self.add(r)

    def settled(self, lo: int = 0, hi: int | None = None) -> bool:
        """Every confirmed id in [lo, hi) ended ok or was dead-lettered."""
        hi = len(self) if hi is None else min(hi, len(self))
        if lo == 0 and hi == len(self):
            return self.done_count + self.dlq_count >= self.ok_count
        if self.done[lo:hi].count(1) + self.dlq[lo:hi].count(1) < self.ok[lo:hi].count(1):
            return False  # the cheap count first; the exact scan once it may hold
        return all(self.done[i] or self.dlq[i] for i in range(lo, hi) if self.ok[i])

    # -- the verdict -------------------------------------------------------------------

    def lost(self) -> list[int]:
        return [i for i in range(len(self)) if self.ok[i] and not self.done[i] and not self.dlq[i]]

    def duplicated(self) -> list[int]:
        return [i for i in range(len(self)) if self.starts[i] > 1]

    def unexpected(self) -> list[str]:
        never_sent = [key(i) for i in range(len(self))
                      if (self.starts[i] or self.done[i]) and math.isnan(self.sent_t[i])]
        return never_sent + self.foreign

    def latencies_ms(self, lo: int, hi: int) -> list[float]:
        """enqueue (ENQ_SENT, before the publish) -> first START, of ids in [lo, hi)."""
        hi = min(hi, len(self))
        return [(self.start_t[i] - self.sent_t[i]) * 1000 for i in range(lo, hi)
                if self.starts[i] and not math.isnan(self.sent_t[i])]

    def span(self, lo: int, hi: int) -> tuple[float, float]:
        """(first START, last END ok) among ids in [lo, hi)."""
        hi = min(hi, len(self))
        starts = [self.start_t[i] for i in range(lo, hi) if self.starts[i]]
        ends = [self.end_t[i] for i in range(lo, hi) if self.done[i]]
        return (min(starts, default=_NAN), max(ends, default=_NAN))


def crosscheck(ledger: Ledger, tally: Tally) -> str:
    """The shared checker's summary over the whole ledger, and whether it agrees."""
    rep = check(ledger.read())
    agree = (len(rep.lost) == len(tally.lost()) and len(rep.dup_exec) == len(tally.duplicated())
             and len(rep.unexpected) == len(tally.unexpected())
             and rep.enqueued == tally.ok_count)
    return (f"tests.faults.ledger.check: {rep.summary()}\n"
            f"tally agrees with check: {'yes' if agree else 'NO'}")
