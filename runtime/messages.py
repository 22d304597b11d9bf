"""The wire format: task messages, canvas nodes and results (msgspec Structs).

Every message carries its version as the tag ``v`` (missing means 1). Decoding is strict (no str/number
coercion); unknown fields are ignored so that newer producers can add
optional fields without breaking older workers.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

__all__ = [
    "ChainNode",
    "ChordNode",
    "ChordRef",
    "ErrorInfo",
    "GroupNode",
    "Node",
    "Result",
    "SigNode",
    "State",
    "TaskMessage",
    "TaskOptions",
]

VERSION = 1


class State(enum.StrEnum):
    PENDING = "PENDING"
    STARTED = "STARTED"
    RETRY = "RETRY"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    REVOKED = "REVOKED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({State.SUCCESS, State.FAILURE, State.REVOKED})


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-call options a signature may set (``task.s(...).set(...)``)."""

    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    expires: float | None = None
    retries: int | None = None
    timeout: float | None = None


class SigNode(msgspec.Struct, frozen=True, kw_only=True, tag="sig", omit_defaults=True):
    """One task call, with its id decided when the canvas is compiled."""

    id: str
    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    immutable: bool = False
    options: TaskOptions = TaskOptions()
    errbacks: list[SigNode] = []


class GroupNode(msgspec.Struct, frozen=True, kw_only=True, tag="group"):
    """Members that run in parallel; the result is their results in order."""

    id: str
    members: list[Node]


class ChainNode(msgspec.Struct, frozen=True, kw_only=True, tag="chain"):
    """Steps where each result is passed to the next."""

    id: str
    steps: list[Node]


class ChordNode(msgspec.Struct, frozen=True, kw_only=True, tag="chord"):
    """A group whose ordered results are passed to ``body`` once."""

    id: str
    header: list[Node]
    body: Node | None = None


Node = SigNode | GroupNode | ChainNode | ChordNode


class ChordRef(msgspec.Struct, frozen=True, kw_only=True):
    """Carried by each member of a chord header (or of a group that must be
    joined): where to count it and what to run once all are in."""

    id: str
    index: int
    size: int
    #: What runs with the ordered results; None stores the list as the result.
    body: Node | None = None
    #: What follows the join (the rest of an enclosing chain).
    links: list[Node] = []
    #: The enclosing join this one's outcome counts into, if any.
    outer: ChordRef | None = None


class TaskMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                  tag_field="v", tag=VERSION):
    """One task to run. ``"v": 1`` is on the wire; another version is refused."""

    id: str
    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    queue: str = "default"
    priority: int = 0
    attempt: int = 1
    #: Absolute times in epoch milliseconds (UTC), informational for eta and
    #: enforced for expiry; delays travel as relative seconds on the envelope.
    eta_ms: int | None = None
    expires_ms: int | None = None
    retries: int | None = None
    timeout: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    #: The rest of a chain: run after this task with its result.
    links: list[Node] = []
    #: Run once with the failure if this task fails for good.
    errbacks: list[SigNode] = []
    chord: ChordRef | None = None
    #: Ids that also fail when this task fails for good (later chain steps,
    #: enclosing chords), so their waiters learn of the failure at once.
    downstream: list[str] = []
    #: At most one execution per id (the worker claims the id first).
    once: bool = False
    headers: dict[str, str] = {}


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A failure, stored as names and text only (never an importable type)."""

    type: str
    message: str
    traceback: str = ""
    reason: str = ""


class Result(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
             tag_field="v", tag=VERSION):
    """The state (and, when terminal, the outcome) of one task id."""

    id: str
    state: State
    task: str = ""
    value: Any = None
    error: ErrorInfo | None = None
    attempt: int = 1
    delivery_count: int = 0
    worker: str = ""
    started_ms: int | None = None
    finished_ms: int | None = None
