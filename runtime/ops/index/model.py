"""The task index's vocabulary: a task's summary, the query, a page, the limits."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from runtime.errors import ConfigError
from runtime.lifecycle import Phase, Transition

__all__ = ["IndexSettings", "Page", "Query", "TaskSummary", "decode_cursor", "encode_cursor",
           "order_of", "summarize"]


class IndexSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retention: each state keeps its newest ``max_per_state`` tasks, none older
    than ``max_age_s``; transitions are written in batches of ``batch``."""

    max_per_state: int = 100_000
    max_age_s: float = 7 * 24 * 3600.0
    batch: int = 512

    def __post_init__(self) -> None:
        if self.max_per_state < 1 or self.max_age_s <= 0 or self.batch < 1:
            raise ConfigError(f"index settings must be positive, got {self!r}; "
                              "use max_per_state >= 1, max_age_s > 0, batch >= 1")


class TaskSummary(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the index knows of one task (the result store has the value)."""

    id: str
    name: str
    state: Phase
    queue: str
    attempt: int = 1
    #: when it entered its current state (ms since the epoch): the listing's order
    at_ms: int = 0
    enqueued_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    eta_ms: int | None = None
    worker: str = ""
    error_type: str = ""
    error: str = ""
    reason: str = ""
    parent_id: str = ""
    root_id: str = ""


class Query(msgspec.Struct, frozen=True, kw_only=True):
    states: tuple[Phase, ...] = ()
    queue: str | None = None
    name: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 50
    cursor: str | None = None


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """Newest first; pass ``next_cursor`` back for the next page (None: the end)."""

    items: list[TaskSummary]
    next_cursor: str | None = None


_RANK = {Phase.ENQUEUED: 0, Phase.SCHEDULED: 0, Phase.STARTED: 1, Phase.RETRYING: 2}


def order_of(t: Transition) -> int:
    """Transitions of one task may arrive out of order (a fast worker reports
    STARTED before the client's ENQUEUED lands): a later step never loses to an
    earlier one. Ends beat everything, then attempts, then the step."""
    return (1 << 30 if t.phase.final else 0) + t.attempt * 4 + _RANK.get(t.phase, 3)


def summarize(t: Transition, old: TaskSummary | None) -> TaskSummary:
    """The summary after ``t`` (the caller checked ``order_of``)."""
    enq = old.enqueued_ms if old is not None else None
    started = old.started_ms if old is not None else None
    if t.phase in (Phase.ENQUEUED, Phase.SCHEDULED) and enq is None:
        enq = t.at_ms
    if t.phase is Phase.STARTED:
        started = t.at_ms
    return TaskSummary(
        id=t.id, name=t.task, state=t.phase, queue=t.queue, attempt=t.attempt, at_ms=t.at_ms,
        enqueued_ms=enq, started_ms=started, finished_ms=t.at_ms if t.phase.final else None,
        eta_ms=t.eta_ms, worker=t.worker or (old.worker if old is not None else ""),
        error_type=t.error_type, error=t.error, reason=t.reason,
        parent_id=t.parent_id, root_id=t.root_id)


def encode_cursor(score: int, task_id: str) -> str:
    return f"{score}:{task_id}"


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    score, sep, task_id = cursor.partition(":")
    try:
        if not sep:
            raise ValueError(cursor)
        return int(score), task_id
    except ValueError:
        raise ConfigError(f"bad cursor {cursor!r}: pass the next_cursor of a page "
                          "unchanged") from None


def states_of(states: Sequence[Phase]) -> tuple[Phase, ...]:
    return tuple(states) or tuple(Phase)


def after(score: int, task_id: str, cursor: tuple[int, str] | None) -> bool:
    """Whether (score, id) comes after ``cursor`` in newest-first order."""
    return cursor is None or (score, task_id) < cursor
