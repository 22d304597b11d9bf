"""The wire format: task messages, canvas nodes and results (msgspec Structs).

Every message carries its version as the tag ``v`` (missing means 1). Decoding is strict (no str/number
coercion); unknown fields are ignored so that newer producers can add
optional fields without breaking older workers.

Every number a worker reads from a task message is bounded at decode time
(``attempt``, ``retries``, ``priority``, times, ``timeout``, a chord
reference's index and size), so nothing it later writes (results, retries,
dead letters) can fail to encode; a message out of range is a
``decode_error``. The worker then checks the canvas references
(:func:`check_references`) before anything runs: a failure is ``bad_message``.
These checks reject only values no producer of this version sends: the
format is unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

__all__ = [
    "ChainNode",
    "ChordNode",
    "ChordRef",
    "ErrorInfo",
    "GroupNode",
    "Node",
    "Progress",
    "Result",
    "SigNode",
    "State",
    "TaskMessage",
    "TaskOptions",
    "check_references",
    "final_id",
    "owned_downstream",
]

VERSION = 1

#: The largest count (attempt, retries, chord size) a message may carry.
MAX_COUNT = 2**31 - 1
#: The largest epoch-millisecond time a message may carry (year ~287,000).
MAX_TIME_MS = 2**53
#: The longest time limit a message may carry, in seconds (~31 years).
MAX_TIMEOUT_S = 1e9
#: Priorities run from 0 to this (the broker serves higher first).
MAX_PRIORITY = 9

_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_Attempt = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
_Size = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
_Priority = Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIORITY)]
_TimeMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIME_MS)]
_Timeout = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIMEOUT_S)]
_Id = Annotated[str, msgspec.Meta(min_length=1)]


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


#: Per-call limits ride in these headers (``runtime.ops.limits.gate`` reads them).
HEADER_RATE = "taskloom-rate-limit"
HEADER_CONCURRENCY = "taskloom-concurrency-limit"


class TaskOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Per-call options a signature may set (``task.s(...).set(...)``)."""

    queue: str | None = None
    priority: int | None = None
    countdown: float | None = None
    expires: float | None = None
    retries: int | None = None
    timeout: float | None = None
    #: flow control for this call (carried in the message's headers)
    rate_limit: str | None = None
    concurrency_limit: int | None = None
    #: how long this call's result / failure is kept (over the task's)
    result_ttl: float | None = None
    failure_ttl: float | None = None


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

    id: _Id
    index: _Count
    size: _Size
    #: What runs with the ordered results; None stores the list as the result.
    body: Node | None = None
    #: What follows the join (the rest of an enclosing chain).
    links: list[Node] = []
    #: The enclosing join this one's outcome counts into, if any.
    outer: ChordRef | None = None


class TaskMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                  tag_field="v", tag=VERSION):
    """One task to run. ``"v": 1`` is on the wire; another version is refused."""

    id: _Id
    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    queue: str = "default"
    priority: _Priority = 0
    attempt: _Attempt = 1
    #: Absolute times in epoch milliseconds (UTC), informational for eta and
    #: enforced for expiry; delays travel as relative seconds on the envelope.
    eta_ms: _TimeMs | None = None
    expires_ms: _TimeMs | None = None
    retries: _Count | None = None
    timeout: _Timeout | None = None
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
    #: This call's retention (``.set(result_ttl=, failure_ttl=)``), over the
    #: task's; omitted when unset (a worker that predates them ignores them).
    result_ttl: float | None = None
    failure_ttl: float | None = None


def final_id(node: Node) -> str:
    """The id a node's outcome is stored under."""
    if isinstance(node, ChordNode):
        return final_id(node.body) if node.body is not None else node.id
    return node.id


def owned_downstream(links: Sequence[Node], ref: ChordRef | None) -> list[str]:
    """The ids that wait on a message with these ``links`` and ``chord``: the
    final ids of its later chain steps and of every enclosing join, its body
    and the steps after it. The only ids besides its own a message may write
    a result for (a failure that reaches them)."""
    ids = [final_id(n) for n in links]
    while ref is not None:
        ids.append(ref.id)
        if ref.body is not None:
            ids.append(final_id(ref.body))
        ids.extend(final_id(n) for n in ref.links)
        ref = ref.outer
    return ids


def check_references(message: TaskMessage) -> str | None:
    """What is wrong with the canvas references of ``message`` (None if
    nothing): every chord reference's index must be below its size, and its
    ``downstream`` ids must be among those its own links and chord name, so
    that a message only ever writes results for ids it owns."""
    ref = message.chord
    while ref is not None:
        if ref.index >= ref.size:
            return f"chord {ref.id!r}: member index {ref.index} is outside 0..{ref.size - 1}"
        ref = ref.outer
    if message.downstream:
        owned = set(owned_downstream(message.links, message.chord))
        if not owned.issuperset(message.downstream):
            return ("downstream names ids that the message's own links and chord do not; "
                    "refusing to write results for them")
    return None


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A failure, stored as names and text only (never an importable type)."""

    type: str
    message: str
    traceback: str = ""
    reason: str = ""


class Progress(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How far a running task says it is (``current_task().progress(...)``)."""

    done: float
    total: float | None = None
    message: str | None = None
    meta: dict[str, Any] = {}
    at_ms: int = 0


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
    #: what the task put in ``current_task().meta``
    meta: dict[str, Any] = {}
    #: the latest ``ctx.progress(...)``: done, total, message and its own meta
    progress: Progress | None = None
    #: how long the store keeps this record (the task's result_ttl/failure_ttl),
    #: None for the store's own ttl
    ttl_s: float | None = None
