"""Admission: the seam through which flow control (rate limits, per-key
concurrency limits) decides whether a delivered task may run now.

The worker asks every gate, in order, before it runs a task (after decoding
and the checks that dead-letter bad input, before the body). A gate answers
``None`` (run now; it may have taken a permit) or a delay in seconds: the
worker then puts the message back in the broker's delay store with that
delay — the same id and attempt, not counted as a retry — and settles the
delivery, so a waiting task holds neither a worker slot nor a prefetch slot.
A gate that took a permit hears ``done()`` once the outcome is stored (or
the task was deferred by a later gate), whatever the outcome; its permits are
leases, so a worker that dies without calling ``done()`` loses them when the
lease lapses (``serve()`` renews the leases of running tasks).

With no gate the worker does no work at all for this. A gate that cannot
reach its store raises; the worker then defers the task by a short delay and
logs it, rather than running it past a limit it could not check.
"""

from __future__ import annotations

from typing import Protocol

from runtime.messages import TaskMessage

__all__ = ["Gate"]


class Gate(Protocol):
    async def admit(self, message: TaskMessage, /) -> float | None:
        """``None`` to run now, else the seconds to wait in the broker first."""

    async def done(self, message: TaskMessage, /) -> None:
        """The task that ``admit`` let run has ended: give back permits (a plain
        success may still be on its way to the result store, batched)."""

    async def serve(self) -> None:
        """Run while the worker runs (renew leases of running tasks); cancelled at stop."""
