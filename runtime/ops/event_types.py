"""The events of the stream (see :mod:`runtime.ops.events`): typed, versioned msgspec
Structs tagged by ``kind``; each carries ``v``, the version of its fields. Readers
ignore fields they do not know and refuse nothing.

``task_json(t)`` is a transition's ``TaskEvent`` as JSON, made straight from the
``Transition`` (which has the same fields) without building the event.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from runtime.lifecycle import Phase, Transition

__all__ = ["EVENTS_VERSION", "MAX_ERROR", "Event", "EventRecord", "Gap", "ProgressEvent",
           "TaskEvent", "TickEvent", "WorkerEvent", "encode_event", "task_event", "task_json"]

EVENTS_VERSION = 1
#: The longest error message an event carries.
MAX_ERROR = 500


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, tag="task",
                tag_field="kind"):
    """A task moved to ``phase`` (the fields of ``runtime.lifecycle.Transition``)."""

    id: str
    task: str
    queue: str
    phase: Phase
    at_ms: int
    attempt: int = 1
    worker: str = ""
    eta_ms: int | None = None
    error_type: str = ""
    error: str = ""
    reason: str = ""
    parent_id: str = ""
    root_id: str = ""
    v: int = EVENTS_VERSION


class ProgressEvent(msgspec.Struct, frozen=True, kw_only=True,
                    tag="progress", tag_field="kind"):
    id: str
    task: str
    at_ms: int
    current: float = 0.0
    total: float | None = None
    message: str = ""
    v: int = EVENTS_VERSION


class WorkerEvent(msgspec.Struct, frozen=True, kw_only=True, tag="worker",
                  tag_field="kind"):
    worker: str
    what: Literal["online", "heartbeat", "offline"]
    at_ms: int
    state: str = ""
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    lag_ms: float = 0.0
    v: int = EVENTS_VERSION


class TickEvent(msgspec.Struct, frozen=True, kw_only=True, tag="tick",
                tag_field="kind"):
    """A scheduler published (or skipped) one tick of a schedule."""

    schedule: str
    task_id: str
    tick_ms: int
    at_ms: int
    skipped: bool = False
    v: int = EVENTS_VERSION


class Gap(msgspec.Struct, frozen=True, kw_only=True, tag="gap", tag_field="kind"):
    """Events after ``since`` were trimmed before this reader got them."""

    since: str
    resumed_at: str
    v: int = EVENTS_VERSION


Event = TaskEvent | ProgressEvent | WorkerEvent | TickEvent | Gap


class EventRecord(msgspec.Struct, frozen=True):
    """One event and its stream id (pass the id as ``since`` to resume after it)."""

    id: str
    event: Event


_ENC = msgspec.json.Encoder()
_TASK_HEAD = b'{"kind":"task","v":%d,' % EVENTS_VERSION
encode_event = _ENC.encode


def task_event(t: Transition) -> TaskEvent:
    return TaskEvent(id=t.id, task=t.task, queue=t.queue, phase=t.phase, at_ms=t.at_ms,
                     attempt=t.attempt, worker=t.worker, eta_ms=t.eta_ms,
                     error_type=t.error_type, error=t.error[:MAX_ERROR], reason=t.reason,
                     parent_id=t.parent_id, root_id=t.root_id)


def task_json(t: Transition) -> bytes:
    """``encode_event(task_event(t))``, but the JSON of ``t`` itself under the
    event's head when nothing needs cutting (same fields, same names)."""
    if len(t.error) <= MAX_ERROR:
        return _TASK_HEAD + _ENC.encode(t)[1:]
    return _ENC.encode(task_event(t))
