"""What follows an outcome: the canvas continuation.

:mod:`runtime.canvas` compiles a canvas into the messages that begin it; this
module carries a running one on. The worker classifies each delivery's
outcome once (an :class:`Outcome`) and hands it to :meth:`Flow.carry_out`,
which stores it and publishes what follows: the next chain step, a group's or
chord's join (and the body or the steps after it), a replacement canvas, the
next attempt of a retried task, the errbacks of a failure. Only then does the
worker settle the delivery (late ack: a worker that dies before leaves the
message to be delivered again).

What follows is idempotent, so a death between sending it and settling costs
a duplicate, never a loss: a join counts ids, chord bodies, the steps after a
join and errbacks run at most once (``once``: the worker claims the id first,
:meth:`Flow.claim`), and a duplicate of a task that succeeded already sends
what follows its stored result again.

A failure for good is also written on every id waiting downstream (later
chain steps, enclosing chords: ids the codec checked the message owns), so
their waiters learn of it at once.

Every result-store call goes through :class:`runtime.persist.StoreRetry`:
retried in place while the store is down.
"""

from __future__ import annotations

import enum
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from runtime import canvas
from runtime.context import CurrentTask
from runtime.deadletters import DeadLetterReason as Why
from runtime.errors import EncodeError, EnqueueError, PayloadTooLarge
from runtime.messages import ChordRef, ErrorInfo, Result, SigNode, State, TaskMessage
from runtime.persist import StoreRetry, type_name
from runtime.states import StateWriter

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["CLAIM_LEASE_S", "Flow", "Kind", "Outcome", "error_info", "now_ms"]

log = structlog.get_logger("taskloom.worker")

#: How long a claim on an at-most-once message outlives a dead holder.
CLAIM_LEASE_S = 6.0


def now_ms() -> int:
    return int(time.time() * 1000)


def error_info(exc: BaseException, reason: Why) -> ErrorInfo:
    return ErrorInfo(
        type=type_name(exc),
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        reason=reason.value,
    )


def reason_of(value: str, default: Why) -> Why:
    """``value`` as a dead-letter reason, ``default`` if it is none."""
    try:
        return Why(value)
    except ValueError:
        return default


def _claim_key(msg: TaskMessage) -> str:
    return f"{msg.id}#{msg.attempt}"


class Kind(enum.Enum):
    """What became of a delivery, and so what is stored, sent and settled."""

    #: Store the value; send the next chain step or count it into its join; ack.
    SUCCESS = "success"
    #: The task returned a canvas: start it in the task's place; ack.
    REPLACE = "replace"
    #: Store RETRY; publish the next attempt after ``delay_s``; ack.
    RETRY = "retry"
    #: Store FAILURE (here and downstream); run the errbacks; dead-letter with ``reason``.
    FAILURE = "failure"
    #: Cancelled before it ran: store REVOKED (here and downstream); ack.
    REVOKED = "revoked"
    #: Expired before it ran: store REVOKED (here and downstream); run the errbacks; ack.
    EXPIRED = "expired"
    #: A once-only task that ran already: send again what follows a stored success; ack.
    DUPLICATE = "duplicate"
    #: Nothing can be stored (not a task message, broken references): dead-letter.
    DEAD_LETTER = "dead_letter"
    #: Hand the delivery back to run after ``delay_s``.
    RELEASE = "release"
    #: An admission gate said wait: publish the same message (same id and
    #: attempt, not a retry) after ``delay_s``; store nothing; ack.
    DEFERRED = "deferred"


@dataclass(slots=True, frozen=True, kw_only=True)
class Outcome:
    """One delivery's outcome, decided once by the worker."""

    kind: Kind
    #: the task's return value (SUCCESS, REPLACE), a stored success (DUPLICATE)
    value: Any = None
    #: DUPLICATE: whether ``value`` is a stored success to follow up
    follow: bool = False
    info: ErrorInfo | None = None
    #: FAILURE, DEAD_LETTER: the reason the dead letter carries
    reason: Why | None = None
    delay_s: float | None = None
    #: when the task started (ms), if it did
    started: int | None = None
    #: the task has run: an unexpected error from here releases the delivery
    ran: bool = False
    #: the task's context, when it left meta or progress to store, or has hooks
    ctx: CurrentTask | None = None
    #: what the body raised (for on_failure / on_retry hooks)
    exc: BaseException | None = None

    @classmethod
    def failure(cls, info: ErrorInfo, *, started: int | None = None, ran: bool = False
                ) -> Outcome:
        return cls(kind=Kind.FAILURE, info=info, reason=reason_of(info.reason, Why.FAILED),
                   started=started, ran=ran)


def _extra(outcome: Outcome) -> dict[str, Any]:
    """The meta and last progress of the task's context, to store with its outcome."""
    ctx = outcome.ctx
    if ctx is None:
        return {}
    return {"meta": ctx.meta, "progress": ctx.last_progress}


class Flow:
    """Stores outcomes and sends what follows them, for one worker."""

    def __init__(self, runtime: Runtime, worker: str, persist: StoreRetry, *,
                 states: StateWriter | None = None) -> None:
        self.runtime = runtime
        self.worker = worker
        self.persist = persist
        self.states = states
        #: failures for good so far (``Worker.failed``)
        self.failed = 0

    async def carry_out(self, msg: TaskMessage, outcome: Outcome, count: int) -> Outcome:
        """Store ``outcome`` and publish what follows it; return the outcome to
        settle: a success whose result cannot be stored, or whose follow-up
        cannot be sent, becomes a failure (``bad_result``, ``bad_follow_up``).
        ``count`` is the broker's delivery count, recorded in the result."""
        kind = outcome.kind
        if self.states is not None:
            self.states.discard(msg.id)  # a STARTED/progress record must not follow it
        if kind is Kind.SUCCESS or kind is Kind.REPLACE:
            outcome = await self._succeed(msg, outcome, count)
            kind = outcome.kind
        if kind is Kind.FAILURE:
            await self._fail(msg, outcome, count)
        elif kind is Kind.RETRY:
            await self._retry(msg, outcome, count)
        elif kind is Kind.REVOKED or kind is Kind.EXPIRED:
            assert outcome.info is not None
            await self._end(msg, State.REVOKED, outcome.info)
            if kind is Kind.EXPIRED and msg.errbacks:
                await self.errbacks(msg, msg.errbacks, outcome.info)
        elif kind is Kind.DEFERRED:
            await self.runtime.publish([msg], delay_s=outcome.delay_s, announce=False)
        elif kind is Kind.DUPLICATE and outcome.follow:
            # its worker may have died before sending what follows: send it
            # (what follows is idempotent: joins count ids, next steps claim)
            await self.follow_up(msg, outcome.value)
        return outcome

    async def _succeed(self, msg: TaskMessage, outcome: Outcome, count: int) -> Outcome:
        started = outcome.started
        try:
            if outcome.kind is Kind.REPLACE:
                await self.replace(msg, outcome.value)
                return outcome
            result = self.success(msg, outcome, count)
            try:
                await self.store(result)
            except (PayloadTooLarge, EncodeError) as e:
                return Outcome.failure(error_info(e, Why.BAD_RESULT), started=started, ran=True)
            await self.follow_up(msg, outcome.value)
        except EnqueueError as e:
            # a follow-up (next step, chord body, replacement) cannot be sent
            return Outcome.failure(error_info(e, Why.BAD_FOLLOW_UP), started=started, ran=True)
        log.debug("task succeeded", task_id=msg.id, task=msg.task, attempt=msg.attempt,
                  duration_ms=result.finished_ms - started
                  if result.finished_ms and started is not None else None)
        return outcome

    def success(self, msg: TaskMessage, outcome: Outcome, count: int) -> Result:
        """The SUCCESS record of ``msg`` that returned ``outcome.value``."""
        return Result(id=msg.id, task=msg.task, state=State.SUCCESS, value=outcome.value,
                      attempt=msg.attempt, delivery_count=count, worker=self.worker,
                      started_ms=outcome.started, finished_ms=now_ms(),
                      ttl_s=self._ttl(msg, failed=False), **_extra(outcome))

    async def _retry(self, msg: TaskMessage, outcome: Outcome, count: int) -> None:
        await self.store(Result(id=msg.id, task=msg.task, state=State.RETRY, error=outcome.info,
                                attempt=msg.attempt, delivery_count=count, worker=self.worker,
                                started_ms=outcome.started, **_extra(outcome)))
        again = msgspec.structs.replace(msg, attempt=msg.attempt + 1)
        await self.runtime.publish([again], delay_s=outcome.delay_s, announce=False)

    async def _fail(self, msg: TaskMessage, outcome: Outcome, count: int) -> None:
        """A failure for good: store it (and on everything waiting downstream),
        run the errbacks once; the worker then dead-letters the message."""
        info = outcome.info
        assert info is not None and outcome.reason is not None
        self.failed += 1
        log.warning("task failed", task_id=msg.id, task=msg.task, attempt=msg.attempt,
                    reason=outcome.reason.value,  # with encryption on, the text stays sealed
                    error=info.type if self.runtime.codec.encrypts
                    else f"{info.type}: {info.message[:300]}")
        now = now_ms()
        ttl = self._ttl(msg, failed=True)
        failure = Result(id=msg.id, task=msg.task, state=State.FAILURE, error=info,
                         attempt=msg.attempt, delivery_count=count, worker=self.worker,
                         started_ms=outcome.started, finished_ms=now, ttl_s=ttl,
                         **_extra(outcome))
        upstream = ErrorInfo(type=info.type, message=info.message, traceback=info.traceback,
                             reason=f"upstream:{msg.id}")
        results = [failure] + [
            Result(id=i, state=State.FAILURE, error=upstream, worker=self.worker, finished_ms=now,
                   ttl_s=ttl)
            for i in msg.downstream
        ]
        await self.store_many(results)
        if msg.errbacks:
            await self.errbacks(msg, msg.errbacks, info)

    async def _end(self, msg: TaskMessage, state: State, info: ErrorInfo) -> None:
        """Store a terminal non-success for ``msg`` and everything waiting on it."""
        now = now_ms()
        upstream = ErrorInfo(type=info.type, message=info.message, traceback=info.traceback,
                             reason=f"upstream:{msg.id}")
        await self.store_many(
            [Result(id=msg.id, task=msg.task, state=state, error=info, attempt=msg.attempt,
                    worker=self.worker, finished_ms=now)]
            + [Result(id=i, state=state, error=upstream, worker=self.worker, finished_ms=now)
               for i in msg.downstream])

    def _ttl(self, msg: TaskMessage, *, failed: bool) -> float | None:
        """The call's ``failure_ttl`` (failed) or ``result_ttl``, else the
        task's; None: the store's."""
        own = msg.failure_ttl if failed else msg.result_ttl
        if own is not None:
            return own
        task = self.runtime.registry.get(msg.task)
        if task is None:
            return None
        return task.failure_ttl if failed else task.result_ttl

    # -- what follows ------------------------------------------------------------

    async def follow_up(self, msg: TaskMessage, value: Any) -> None:
        """What comes after ``msg`` succeeded with ``value``: the next chain
        step, or its part of a join."""
        if msg.links:
            await self.runtime.publish(canvas.start(
                msg.links[0], self.runtime.registry, prev=value, links=msg.links[1:],
                ref=msg.chord, parent_id=msg.id, root_id=msg.root_id))
        elif msg.chord is not None:
            await self.join(msg.chord, value, msg)

    async def join(self, ref: ChordRef, value: Any, msg: TaskMessage) -> None:
        """Count ``value`` into ``ref``; the call that finds it complete goes on."""
        rt = self.runtime
        values = await self.persist("join", lambda: rt.results.join(ref.id, ref.index, ref.size,
                                                                    value))
        if values is None:
            return
        if ref.body is not None:
            await rt.publish(canvas.start(ref.body, rt.registry, prev=values, links=ref.links,
                                          ref=ref.outer, parent_id=msg.id, root_id=msg.root_id,
                                          once=True))
            return
        await self.store(Result(id=ref.id, state=State.SUCCESS, value=values,
                                worker=self.worker, finished_ms=now_ms()))
        if ref.links:
            await rt.publish(canvas.start(ref.links[0], rt.registry, prev=values,
                                          links=ref.links[1:], ref=ref.outer,
                                          parent_id=msg.id, root_id=msg.root_id, once=True))
        elif ref.outer is not None:
            await self.join(ref.outer, values, msg)

    async def replace(self, msg: TaskMessage, value: canvas.Canvas) -> None:
        """The task returned a canvas: run it in this task's place."""
        rt = self.runtime
        node = canvas.to_node(value, final=msg.id, first=True)
        await rt.publish(canvas.start(node, rt.registry, links=msg.links, ref=msg.chord,
                                      parent_id=msg.id, root_id=msg.root_id))

    async def errbacks(self, msg: TaskMessage, errbacks: list[SigNode], info: ErrorInfo) -> None:
        """Start each errback once as ``errback(task_id, error, *its args)``;
        one that cannot be built or sent is logged, never raised."""
        rt = self.runtime
        error = {"type": info.type, "message": info.message, "reason": info.reason}
        out: list[TaskMessage] = []
        for node in errbacks:
            fed = msgspec.structs.replace(node, args=[msg.id, error, *node.args], immutable=True)
            try:
                out.extend(canvas.start(fed, rt.registry, parent_id=msg.id, root_id=msg.root_id,
                                        once=True))
            except EnqueueError as e:
                log.error("cannot run an errback", task_id=msg.id, errback=node.task, error=str(e))
        try:
            await rt.publish(out)
        except EnqueueError as e:
            log.error("cannot publish errbacks", task_id=msg.id, error=str(e))

    # -- at most once ------------------------------------------------------------

    async def claim(self, msg: TaskMessage, holder: str) -> Outcome | None:
        """At most one execution per id (chord bodies, steps after a join,
        errbacks): None if ``holder`` may run ``msg``, else what to do with
        this duplicate. The claim is a short lease, renewed while the task
        runs (:meth:`keeping_claim`), so a holder that dies frees it within
        ``CLAIM_LEASE_S``."""
        results = self.runtime.results
        existing = await self.persist("read", lambda: results.get(msg.id))
        unfinished = existing is None or not existing.state.terminal
        if unfinished and await self.persist("claim", lambda: results.claim(
                _claim_key(msg), CLAIM_LEASE_S, holder=holder)):
            # it may have finished between the look and the claim
            existing = await self.persist("read", lambda: results.get(msg.id))
            if existing is None or not existing.state.terminal:
                return None
        if existing is not None and existing.state.terminal:
            log.info("skipping a duplicate of a task that ran already", task_id=msg.id)
            return Outcome(kind=Kind.DUPLICATE, value=existing.value,
                           follow=existing.state is State.SUCCESS)
        log.info("a duplicate is running elsewhere; checking again later", task_id=msg.id)
        return Outcome(kind=Kind.RELEASE, delay_s=CLAIM_LEASE_S / 2)

    async def keeping_claim(self, msg: TaskMessage, holder: str,
                            call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()`` while renewing the claim of ``msg``; its exception, if
        any, is raised as it is (not in an exception group)."""
        outcome: list[Any] = []
        failure: list[Exception] = []

        async def body() -> None:
            try:
                outcome.append(await call())
            except Exception as e:
                failure.append(e)
            finally:
                tg.cancel_scope.cancel()

        async def renew() -> None:
            while True:
                await anyio.sleep(CLAIM_LEASE_S / 3)
                try:
                    await self.runtime.results.claim(_claim_key(msg), CLAIM_LEASE_S,
                                                     holder=holder)
                except Exception as e:
                    # the store is down: the claim may lapse (a duplicate may
                    # then run, visibly); the task itself goes on
                    self.persist.failed("renew a claim", e)
                else:
                    self.persist.recovered()

        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            tg.start_soon(body)
        if failure:
            raise failure[0]
        return outcome[0]

    # -- the result store, retried in place while it is down ---------------------------

    async def store(self, result: Result) -> None:
        results = self.runtime.results
        await self.persist("store a result", lambda: results.put(result))

    async def store_many(self, results: list[Result]) -> None:
        if len(results) == 1:
            await self.store(results[0])
            return
        store = self.runtime.results
        await self.persist("store results", lambda: store.put_many(results))
