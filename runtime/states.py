"""Records written off the hot path: STARTED and progress.

A worker notes the STARTED record of each task it begins, and each progress
report, here; one service task (in the worker's task group) writes what is
pending with ``put_many`` — one round trip for everything noted since the
last one, the latest record per task id only. So a task does not wait for
its STARTED write before its body runs, and a loop reporting progress
100,000 times costs a handful of writes, not 100,000.

These records are advisory: they never overwrite a terminal result (the
store's first-terminal-wins rule), the worker drops the pending one of a
task when it stores that task's outcome, and a write that fails is dropped
(logged once per outage), never retried in the task's way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import structlog

from runtime.messages import Result
from runtime.persist import type_name

if TYPE_CHECKING:
    from runtime.results.base import ResultStore

__all__ = ["StateWriter"]

log = structlog.get_logger("taskloom.worker")


class StateWriter:
    """Coalesces non-terminal records per task id; :meth:`serve` writes them."""

    __slots__ = ("_failing", "_pending", "_wake", "results")

    def __init__(self, results: ResultStore) -> None:
        self.results = results
        self._pending: dict[str, Result] = {}
        self._wake = anyio.Event()
        self._failing = False

    def note(self, result: Result) -> None:
        """Write ``result`` soon (replacing the one pending for its id)."""
        self._pending[result.id] = result
        self._wake.set()

    def discard(self, task_id: str) -> Result | None:
        """Drop the record pending for ``task_id`` (its outcome is being stored)."""
        return self._pending.pop(task_id, None)

    async def serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self._pending:
                continue
            batch, self._pending = list(self._pending.values()), {}
            try:
                await self.results.put_many(batch)
            except Exception as e:  # advisory records: dropped, never retried
                if not self._failing:
                    self._failing = True
                    log.warning("cannot write STARTED/progress records; dropping them until the "
                                "result store answers again", error_type=type_name(e),
                                error=str(e)[:300])
            else:
                if self._failing:
                    self._failing = False
                    log.warning("STARTED/progress records are written again")
