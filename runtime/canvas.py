"""Signatures and the canvas (chain, group, chord), compiled to messages.

Pure: no I/O. A canvas is first turned into a tree of ``Node`` structs with
every id decided (:func:`to_node`), then :func:`start` makes the messages
that begin a node. The rest of the work rides on the messages themselves: a
chain's remaining steps in ``links``, a group's or chord's join in ``chord``.
Every canvas has one *final id*, under which its outcome is stored.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union, overload

import msgspec

from runtime.errors import ConfigError, EnqueueError
from runtime.messages import (
    HEADER_CONCURRENCY,
    HEADER_RATE,
    ChainNode,
    ChordNode,
    ChordRef,
    GroupNode,
    Node,
    SigNode,
    TaskMessage,
    TaskOptions,
    final_id,
    owned_downstream,
)
from runtime.options import check_options

if TYPE_CHECKING:
    from runtime.registry import Task, TaskRegistry

__all__ = [
    "Canvas",
    "Chain",
    "Composable",
    "Chord",
    "Group",
    "Signature",
    "chain",
    "chord",
    "check_call_options",
    "chunks",
    "final_id",
    "group",
    "map",
    "message_for",
    "start",
    "starmap",
    "to_node",
]

_NO_VALUE: Any = object()

if TYPE_CHECKING:
    from typing_extensions import TypeVar as DefaultTypeVar

    #: a canvas's outcome; a bare ``Signature`` (as older code writes it) is ``Signature[Any]``
    R = DefaultTypeVar("R", default=Any)
else:
    R = TypeVar("R")
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")
D = TypeVar("D")


#: ids drawn ahead, one ``os.urandom`` read per _ID_BATCH (emptied in a forked child)
_ids: list[str] = []
_ID_BATCH = 256


def new_id() -> str:
    """A fresh task id: a random (version 4) UUID in hex, as ``uuid.uuid4().hex``
    gives, with the same 122 random bits, but one system call per 256 ids
    instead of one per id plus a ``UUID`` object (the enqueue hot path)."""
    try:
        return _ids.pop()
    except IndexError:
        _draw_ids()
        return _ids.pop()


def _draw_ids() -> None:
    raw = os.urandom(16 * _ID_BATCH).hex()
    _ids.extend([f"{raw[i:i + 12]}4{raw[i + 13:i + 16]}{_VARIANT[raw[i + 16]]}{raw[i + 17:i + 32]}"
                 for i in range(0, 32 * _ID_BATCH, 32)])


#: the RFC 4122 variant: the top two bits of the 17th hex digit are 10
_VARIANT = {f"{n:x}": f"{8 | (n & 3):x}" for n in range(16)}
os.register_at_fork(after_in_child=_ids.clear)  # a child never repeats its parent's ids


class Composable(Generic[R]):
    """Anything ``run``/``enqueue`` take, typed by its outcome ``R``: a
    ``Signature[R]``, a ``Chain[R]`` (the last step's result), a ``Group[R]``
    (``list[R]``) or a ``Chord[R]`` (the body's result).

    Where the types stop: a chain does not check that a step's result fits the
    next step's first parameter, nor a chord that its body takes a list of the
    header's results; ``partial()`` types such a step as "all but its first
    argument". A group of mixed result types is a ``Group[Any]`` or a union."""

    __slots__ = ()

    def __or__(self, other: Composable[T]) -> Chain[T]:
        return chain(self, other)

    @property
    def owner(self) -> Any:
        """The runtime of the first task in this canvas."""
        raise NotImplementedError


class Signature(Composable[R]):
    """A task with its arguments and call options, ready to be enqueued;
    ``R`` is the task's result type."""

    __slots__ = ("args", "errbacks", "immutable", "kwargs", "options", "task")

    def __init__(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        immutable: bool = False,
        options: TaskOptions = TaskOptions(),
        errbacks: tuple[Signature[Any], ...] = (),
    ) -> None:
        self.task = task
        self.args = args
        self.kwargs = kwargs or {}
        self.immutable = immutable
        self.options = options
        self.errbacks = errbacks

    def set(self, **options: Any) -> Signature[R]:
        """A copy with call options changed: queue, priority, countdown,
        expires, retries, timeout; rate_limit, concurrency_limit (this call's
        flow control, over the task's); result_ttl, failure_ttl (how long this
        call's result / failure is kept, over the task's)."""
        unknown = set(options) - set(TaskOptions.__struct_fields__)
        if unknown:
            raise ConfigError(
                f"unknown signature option(s) {sorted(unknown)}; "
                f"use any of {list(TaskOptions.__struct_fields__)}"
            )
        try:
            merged = msgspec.convert({**msgspec.structs.asdict(self.options), **options},
                                     TaskOptions)
        except msgspec.ValidationError as e:
            raise ConfigError(f"{self.task.name}.set(): bad option: {e}") from None
        check_call_options(f"task {self.task.name!r}", merged)
        merged = _checked_limits(self.task, merged)
        return Signature(self.task, self.args, self.kwargs, immutable=self.immutable,
                         options=merged, errbacks=self.errbacks)

    def on_error(self, errback: Signature[Any]) -> Signature[R]:
        """A copy that runs ``errback(task_id, error)`` once if this task fails for good."""
        return Signature(self.task, self.args, self.kwargs, immutable=self.immutable,
                         options=self.options, errbacks=(*self.errbacks, errback))

    @property
    def owner(self) -> Any:
        return self.task.owner

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}.{'si' if self.immutable else 's'}({', '.join(parts)})"


class Chain(Composable[R]):
    """Steps run one after the other; each result is the next step's first
    argument. ``R`` is the last step's result type."""

    def __init__(self, steps: Sequence[Canvas], errbacks: tuple[Signature[Any], ...] = ()
                 ) -> None:
        if not steps:
            raise ConfigError("a chain needs at least one step")
        self.steps = list(steps)
        self.errbacks = errbacks

    def on_error(self, errback: Signature[Any]) -> Chain[R]:
        """A copy that runs ``errback`` once when any step fails for good."""
        return Chain(self.steps, (*self.errbacks, errback))

    @property
    def owner(self) -> Any:
        return self.steps[0].owner

    def __repr__(self) -> str:
        return " | ".join(repr(s) for s in self.steps)


class Group(Composable[list[R]]):
    """Members run in parallel; the result is the list of their results, in
    order. ``R`` is the members' result type (the group's is ``list[R]``)."""

    def __init__(self, members: Iterable[Canvas], errbacks: tuple[Signature[Any], ...] = ()
                 ) -> None:
        self.members = list(members)
        if not self.members:
            raise ConfigError("a group needs at least one member")
        self.errbacks = errbacks

    def on_error(self, errback: Signature[Any]) -> Group[R]:
        return Group(self.members, (*self.errbacks, errback))

    @property
    def owner(self) -> Any:
        return self.members[0].owner

    def __repr__(self) -> str:
        return f"group({', '.join(repr(m) for m in self.members)})"


class Chord(Composable[R]):
    """A group whose ordered results are passed, once, to ``body``; ``R`` is
    the body's result type."""

    def __init__(self, header: Iterable[Canvas], body: Canvas,
                 errbacks: tuple[Signature[Any], ...] = ()) -> None:
        self.header = list(header)
        if not self.header:
            raise ConfigError("a chord needs at least one header member")
        self.body = body
        self.errbacks = errbacks

    def on_error(self, errback: Signature[Any]) -> Chord[R]:
        return Chord(self.header, self.body, (*self.errbacks, errback))

    @property
    def owner(self) -> Any:
        return self.header[0].owner

    def __repr__(self) -> str:
        return f"chord([{', '.join(repr(m) for m in self.header)}], {self.body!r})"


Canvas = Union[Signature[Any], Chain[Any], Group[Any], Chord[Any]]  # noqa: UP007 - runtime alias


@overload
def chain(a: Composable[R], /) -> Chain[R]: ...
@overload
def chain(a: Composable[Any], b: Composable[R], /) -> Chain[R]: ...
@overload
def chain(a: Composable[Any], b: Composable[Any], c: Composable[R], /) -> Chain[R]: ...
@overload
def chain(a: Composable[Any], b: Composable[Any], c: Composable[Any], d: Composable[R], /
          ) -> Chain[R]: ...
@overload
def chain(a: Composable[Any], b: Composable[Any], c: Composable[Any], d: Composable[Any],
          e: Composable[R], /) -> Chain[R]: ...
@overload
def chain(a: Composable[Any], b: Composable[Any], c: Composable[Any], d: Composable[Any],
          e: Composable[Any], f: Composable[Any], /, *rest: Composable[Any]) -> Chain[Any]: ...
@overload
def chain(*steps: Composable[R]) -> Chain[R]: ...  # chain(*a_list), all of one type
def chain(*steps: Composable[Any]) -> Chain[Any]:
    """``chain(a, b, c)`` is ``a | b | c``; nested chains are flattened. Typed
    by its last step's result up to five steps, ``Chain[Any]`` beyond."""
    flat: list[Canvas] = []
    for step in steps:
        if isinstance(step, Chain) and not step.errbacks:
            flat.extend(step.steps)
        else:
            flat.append(step)  # type: ignore[arg-type]  # every Composable is a Canvas
    return Chain(flat)


@overload
def group(members: Iterable[Composable[R]], /) -> Group[R]: ...
@overload
def group(*members: Composable[R]) -> Group[R]: ...
def group(*members: Composable[Any] | Iterable[Composable[Any]]) -> Group[Any]:
    """``group(a, b)`` or ``group(generator_of_signatures)``; a ``Group[R]``
    when every member has result type ``R`` (the group's result is ``list[R]``)."""
    if len(members) == 1 and not isinstance(members[0], Composable):
        return Group(members[0])  # type: ignore[arg-type]
    return Group(members)  # type: ignore[arg-type]


def chord(header: Iterable[Composable[Any]], body: Composable[R]) -> Chord[R]:
    """``body(list of the header's results)``, once; typed by the body's result."""
    return Chord(header, body)  # type: ignore[arg-type]


def map(task: Task[..., R], items: Iterable[Any]) -> Group[R]:
    """``task(item)`` for every item, in parallel."""
    return Group(task.s(item) for item in items)


def starmap(task: Task[..., R], items: Iterable[Sequence[Any]]) -> Group[R]:
    """``task(*item)`` for every item, in parallel."""
    return Group(task.s(*item) for item in items)


def chunks(task: Task[..., R], items: Iterable[Any], n: int) -> Group[R]:
    """Split ``items`` into ``n`` tasks; each gets a list of items and returns a
    list; the group's result is the list of those lists, in order."""
    seq = list(items)
    if n < 1:
        raise ConfigError(f"chunks needs n >= 1, got {n}")
    n = min(n, len(seq)) or 1
    size, extra = divmod(len(seq), n)
    parts: list[list[Any]] = []
    start_at = 0
    for i in range(n):
        end = start_at + size + (1 if i < extra else 0)
        parts.append(seq[start_at:end])
        start_at = end
    return Group(task.s(part) for part in parts)


# -- compile: canvas -> nodes with ids ----------------------------------------------


def check_call_options(where: str, options: TaskOptions) -> None:
    """``options`` of a call (``.set()``, ``enqueue()``) checked by
    :func:`runtime.options.check_options`; raises EnqueueError."""
    check_options(where, EnqueueError, priority=options.priority, countdown=options.countdown,
                  expires=options.expires, timeout=options.timeout, retries=options.retries,
                  result_ttl=options.result_ttl, failure_ttl=options.failure_ttl)


def _checked_limits(task: Task[Any, Any], options: TaskOptions) -> TaskOptions:
    """``options`` with its per-call limits checked and written as the limiter
    reads them, by the task's runtime (flow control sits above the core)."""
    if options.rate_limit is None and options.concurrency_limit is None:
        return options
    check = getattr(task.owner, "call_headers", None)
    if check is None:
        raise ConfigError(f"task {task.name!r}: rate_limit/concurrency_limit need a task "
                          "registered with @runtime.task")
    headers = check(rate_limit=options.rate_limit, concurrency_limit=options.concurrency_limit)
    return msgspec.structs.replace(options, rate_limit=headers.get(HEADER_RATE))


def _headers(opts: TaskOptions) -> dict[str, str]:
    out = {}
    if opts.rate_limit is not None:
        out[HEADER_RATE] = opts.rate_limit
    if opts.concurrency_limit is not None:
        out[HEADER_CONCURRENCY] = str(opts.concurrency_limit)
    return out


def _errback_nodes(errbacks: Sequence[Signature[Any]]) -> list[SigNode]:
    # an errback is called as errback(task_id, error, *its own args)
    return [_sig_node(e, new_id(), [], leading=2) for e in errbacks]


def _sig_node(sig: Signature[Any], node_id: str, errbacks: list[SigNode], *, leading: int) -> SigNode:
    sig.task.bind(sig.args, sig.kwargs, leading=leading)
    return SigNode(
        id=node_id,
        task=sig.task.name,
        args=list(sig.args),
        kwargs=dict(sig.kwargs),
        immutable=sig.immutable,
        options=sig.options,
        errbacks=errbacks + _errback_nodes(sig.errbacks),
    )


def to_node(canvas: Canvas, *, final: str | None = None, first: bool = True,
            errbacks: list[SigNode] | None = None) -> Node:
    """Assign ids; ``final`` is the id the outcome is stored under. Arguments
    are checked here; a later step's first argument is the previous result."""
    inherited = errbacks or []
    node_id = final or new_id()
    if isinstance(canvas, Signature):
        receives_prev = not first and not canvas.immutable
        return _sig_node(canvas, node_id, list(inherited), leading=1 if receives_prev else 0)
    if isinstance(canvas, Chain):
        ebs = inherited + _errback_nodes(canvas.errbacks)
        steps = list(canvas.steps)
        nodes: list[Node] = []
        for i, step in enumerate(steps):
            last = i == len(steps) - 1
            if isinstance(step, Group) and not last:
                # a group followed by a step is a chord of that step
                nxt = steps[i + 1]
                steps[i + 1] = Chord(step.members, nxt, step.errbacks)
                continue
            nodes.append(to_node(step, final=node_id if last else None,
                                 first=first and not nodes, errbacks=ebs))
        if len(nodes) == 1:
            return nodes[0]
        return ChainNode(id=node_id, steps=nodes)
    if isinstance(canvas, Group):
        ebs = inherited + _errback_nodes(canvas.errbacks)
        return GroupNode(id=node_id, members=[
            to_node(m, first=first, errbacks=ebs) for m in canvas.members
        ])
    ebs = inherited + _errback_nodes(canvas.errbacks)
    header = [to_node(m, first=first, errbacks=ebs) for m in canvas.header]
    body = to_node(canvas.body, final=node_id, first=False, errbacks=ebs)
    return ChordNode(id=new_id(), header=header, body=body)


# -- start: nodes -> messages ----------------------------------------------------


def start(
    node: Node,
    registry: TaskRegistry,
    *,
    prev: Any = _NO_VALUE,
    links: Sequence[Node] = (),
    ref: ChordRef | None = None,
    parent_id: str | None = None,
    root_id: str | None = None,
    once: bool = False,
    now_ms: int | None = None,
    overrides: TaskOptions | None = None,
) -> list[TaskMessage]:
    """The messages that begin ``node``, fed ``prev`` (the previous result, if
    any), followed by ``links`` and joining into ``ref`` when done."""
    if isinstance(node, ChainNode):
        return start(node.steps[0], registry, prev=prev, links=[*node.steps[1:], *links], ref=ref,
                     parent_id=parent_id, root_id=root_id, once=once, now_ms=now_ms,
                     overrides=overrides)
    if isinstance(node, (GroupNode, ChordNode)):
        members = node.members if isinstance(node, GroupNode) else node.header
        body = node.body if isinstance(node, ChordNode) else None
        join = ChordRef(id=node.id, index=0, size=len(members), body=body,
                        links=list(links), outer=ref)
        out: list[TaskMessage] = []
        for i, member in enumerate(members):
            out.extend(start(member, registry, prev=prev, ref=msgspec.structs.replace(join, index=i),
                             parent_id=parent_id, root_id=root_id, now_ms=now_ms,
                             overrides=overrides))
        return out
    task = registry[node.task]
    args = node.args if node.immutable or prev is _NO_VALUE else [prev, *node.args]
    return [_message(task, node.id, args, node.kwargs, node.options, overrides, now_ms,
                     errbacks=node.errbacks, links=links, ref=ref, parent_id=parent_id,
                     root_id=root_id, once=once)]


def message_for(sig: Signature[Any], *, task_id: str | None = None,
                overrides: TaskOptions | None = None) -> TaskMessage:
    """The message of one plain signature (the enqueue hot path): the same
    as ``start(to_node(sig))`` without building the tree."""
    if sig.errbacks:
        raise ValueError("message_for takes a signature without errbacks; use to_node + start")
    sig.task.bind(sig.args, sig.kwargs)
    return _message(sig.task, task_id or new_id(), list(sig.args), sig.kwargs, sig.options,
                    overrides, None)


def _message(
    task: Task[Any, Any],
    task_id: str,
    args: list[Any],
    kwargs: dict[str, Any],
    opts: TaskOptions,
    overrides: TaskOptions | None,
    now_ms: int | None,
    *,
    errbacks: list[SigNode] | None = None,
    links: Sequence[Node] = (),
    ref: ChordRef | None = None,
    parent_id: str | None = None,
    root_id: str | None = None,
    once: bool = False,
) -> TaskMessage:
    if overrides is not None:
        changes = {k: v for k, v in msgspec.structs.asdict(overrides).items() if v is not None}
        opts = msgspec.structs.replace(opts, **changes)
    countdown = opts.countdown
    expires = opts.expires if opts.expires is not None else task.expires
    if countdown or expires:
        now = now_ms if now_ms is not None else time.time() * 1000
    return TaskMessage(
        id=task_id,
        task=task.name,
        args=args,
        kwargs=kwargs,
        queue=opts.queue or task.queue,
        priority=opts.priority if opts.priority is not None else task.priority,
        eta_ms=math.ceil(now + countdown * 1000) if countdown else None,
        expires_ms=math.ceil(now + expires * 1000) if expires else None,
        retries=opts.retries,
        timeout=opts.timeout,
        parent_id=parent_id,
        root_id=root_id or parent_id or task_id,
        links=list(links),
        errbacks=errbacks or [],
        chord=ref,
        downstream=owned_downstream(links, ref) if links or ref else [],
        once=once,
        headers=_headers(opts) if opts.rate_limit or opts.concurrency_limit else {},
        result_ttl=opts.result_ttl,
        failure_ttl=opts.failure_ttl,
    )
