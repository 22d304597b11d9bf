"""The ledger: what happened, written outside the system under test, and its checker.

Every process (the test's producer, each worker) appends JSON lines to its own
file opened ``O_APPEND``, one ``os.write`` per record, each under 4 KiB (atomic on
Linux), so a SIGKILL loses at most the record being written and never corrupts
another. Records (RELIABILITY.md §2.1)::

    ENQ_SENT(id)  ENQ_OK(id[, dup])  ENQ_INDET(id, err)  the producer (dup: the
                                                          runtime said duplicate
                                                          and published nothing)
    START(id, x, pid, t)  END(id, x, ok, err, pid, t)    the task bodies (x: one execution)
    KILL(pid, t)  EXIT(pid, rc, t)                        the harness, about worker processes
    DLQ_SEEN(id, reason)                                  the test, after reading the DLQ
    NEMESIS(what)  HEAL(what)  SOAK_START                 the chaos soak: a fault begins,
                                                          ends; the load's t0

``t`` is ``time.monotonic()``: CLOCK_MONOTONIC is system-wide on Linux, so times of
different processes compare. This module imports nothing of the runtime: the
worker processes import it from ``tests/faults/app.py``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "LedgerView", "LedgerWriter", "Report", "check", "new_exec_id"]

_MAX_RECORD = 4096


def new_exec_id() -> str:
    return uuid.uuid4().hex[:12]


class LedgerWriter:
    """Appends records to one file of the ledger directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields: Any) -> None:
        record = {"k": kind, "pid": os.getpid(), "t": time.monotonic(), **fields}
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(data) >= _MAX_RECORD:
            raise ValueError(f"ledger record of {len(data)} bytes is not atomic (< 4 KiB)")
        os.write(self._fd, data)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


class Ledger:
    """The ledger directory: one ``*.jsonl`` file per writing process."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def writer(self, name: str) -> LedgerWriter:
        return LedgerWriter(self.dir / f"{name}.jsonl")

    def read(self) -> LedgerView:
        records: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("*.jsonl")):
            data = path.read_bytes()
            # a record is complete once its newline is written; skip a torn tail
            for line in data.split(b"\n")[:-1]:
                if line:
                    records.append(json.loads(line))
        return LedgerView(records)


class LedgerView:
    """A snapshot of every record, with the small queries tests wait on."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            self.by_kind[r["k"]].append(r)

    def ids(self, kind: str, **match: Any) -> set[str]:
        return {r["id"] for r in self.by_kind[kind]
                if all(r.get(k) == v for k, v in match.items())}

    def done(self) -> set[str]:
        """Ids with at least one END(ok)."""
        return self.ids("END", ok=True)

    def open_starts(self, pid: int | None = None) -> set[str]:
        """Executions started (by ``pid``) that have not ended: tasks running now."""
        ended = {r["x"] for r in self.by_kind["END"]}
        return {r["id"] for r in self.by_kind["START"]
                if r["x"] not in ended and (pid is None or r["pid"] == pid)}

    def starts(self, task_id: str) -> list[dict[str, Any]]:
        return [r for r in self.by_kind["START"] if r["id"] == task_id]


@dataclass
class Report:
    """The checker's metrics (RELIABILITY.md §2.1)."""

    enqueued: int
    lost: set[str]
    recovered: set[str]
    unexpected: set[str]
    dup_exec: dict[str, int]
    concurrent_dup: set[str]
    dlq_false: set[str]
    indeterminate: set[str] = field(default_factory=set)
    #: ids whose every ENQ_OK was a duplicate the runtime refused (nothing sent)
    refused: set[str] = field(default_factory=set)

    def summary(self) -> str:
        def few(s: Iterable[str]) -> list[str]:
            return sorted(s)[:10]
        return (f"enqueued={self.enqueued} lost={len(self.lost)} {few(self.lost)} "
                f"unexpected={len(self.unexpected)} {few(self.unexpected)} "
                f"dup_exec={len(self.dup_exec)} {dict(sorted(self.dup_exec.items())[:10])} "
                f"concurrent_dup={len(self.concurrent_dup)} {few(self.concurrent_dup)} "
                f"dlq_false={len(self.dlq_false)} {few(self.dlq_false)} "
                f"indeterminate={len(self.indeterminate)} recovered={len(self.recovered)} "
                f"refused={len(self.refused)} {few(self.refused)}")


def check(view: LedgerView, *, designed_to_fail: Iterable[str] = ()) -> Report:
    """Jepsen-style total-queue check plus overlap detection.

    - ``lost``: ENQ_OK without an END(ok) and not seen in the DLQ;
    - ``unexpected``: executions of ids never sent;
    - ``dup_exec``: ids with more than one START;
    - ``concurrent_dup``: ids with two executions whose [START, end] intervals
      overlap. An execution ends at its END; without one, at the KILL of its
      process, or at the EXIT of its process; otherwise it is still running.
    - ``dlq_false``: dead-lettered ids not designed to fail;
    - ``refused``: ids confirmed only as duplicates (``ENQ_OK`` with ``dup``):
      the runtime published nothing for them (a lost one among them was never
      sent, whatever the broker did).
    """
    failing = set(designed_to_fail)
    sent = view.ids("ENQ_SENT")
    ok = view.ids("ENQ_OK")
    indet = view.ids("ENQ_INDET")
    dlq = view.ids("DLQ_SEEN")
    done = view.done()
    executed = view.ids("START") | view.ids("END")

    ends = {r["x"]: r["t"] for r in view.by_kind["END"]}
    died: dict[int, float] = {}
    for r in view.by_kind["KILL"] + view.by_kind["EXIT"]:
        pid = r["target"]
        died[pid] = min(died.get(pid, r["t"]), r["t"])
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in view.by_kind["START"]:
        end = ends.get(r["x"], died.get(r["pid"], float("inf")))
        intervals[r["id"]].append((r["t"], end))
    concurrent = set()
    for task_id, spans in intervals.items():
        spans.sort()
        reach = float("-inf")
        for start, end in spans:
            if start < reach:
                concurrent.add(task_id)
            reach = max(reach, end)
    starts = Counter(r["id"] for r in view.by_kind["START"])
    return Report(
        enqueued=len(ok),
        lost=ok - done - dlq,
        recovered=indet & done,
        unexpected=executed - sent,
        dup_exec={i: n for i, n in starts.items() if n > 1},
        concurrent_dup=concurrent,
        dlq_false=dlq - failing,
        indeterminate=indet,
        refused=view.ids("ENQ_OK", dup=True) - view.ids("ENQ_OK", dup=None),
    )
