"""Lifecycle: the transitions of a task, and the listeners that hear of them.

A task moves ENQUEUED (or SCHEDULED, when it waits for a countdown or an ETA)
→ STARTED → RETRYING … → one end: SUCCEEDED, FAILED, DEAD_LETTERED, REVOKED or
EXPIRED. The client reports the first transition when it publishes; the worker
reports the others, each after the outcome is stored and before the delivery
is settled (the one settle path), so a listener never hears of an end that
the result store does not hold.

A ``Listener`` is how the operations side (the task index, the event stream,
metrics) learns of them without the core knowing it exists. ``transition()``
is called on the hot path: it must be cheap, never block and never raise —
append to a buffer and flush it in batches from ``serve()``, which runs for as
long as the runtime is open (inside its task group) and is cancelled when it
closes; ``aclose()`` then flushes what is left. With no listener the runtime
does no work at all for this.
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

__all__ = ["Listener", "Phase", "Transition"]


class Phase(enum.StrEnum):
    ENQUEUED = "enqueued"
    SCHEDULED = "scheduled"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    REVOKED = "revoked"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.DEAD_LETTERED, Phase.REVOKED, Phase.EXPIRED})


class Transition(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One step of one task: what it is, where, when, and why it ended."""

    id: str
    task: str
    queue: str
    phase: Phase
    at_ms: int                  # wall clock, ms since the epoch
    attempt: int = 1
    worker: str = ""            # the worker that reported it (empty on the client)
    eta_ms: int | None = None   # SCHEDULED / RETRYING: when it is due
    error_type: str = ""        # FAILED / DEAD_LETTERED / RETRYING: the error's type name
    error: str = ""             # ... and its message, cut short
    reason: str = ""            # DEAD_LETTERED: a DeadLetterReason value
    parent_id: str = ""
    root_id: str = ""


class Listener(Protocol):
    def transition(self, t: Transition, /) -> None:
        """Hear of one transition: cheap, non-blocking, never raises."""

    async def serve(self) -> None:
        """Run while the runtime is open (flush batches); cancelled on close."""

    async def aclose(self) -> None:
        """Flush what is left; called once, after ``serve`` was cancelled."""
