"""The worker's side of the two seams: lifecycle transitions it reports
(:mod:`runtime.lifecycle`) and the admission gates it asks (:mod:`runtime.admission`).

Nothing here runs unless the runtime has a listener or a gate: the worker
guards each call with one ``if``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import AsyncExitStack

import anyio
import structlog

from runtime.admission import Gate
from runtime.deadletters import DeadLetterReason as Why
from runtime.flow import Kind, Outcome, now_ms
from runtime.lifecycle import Listener, Phase, Transition
from runtime.messages import TaskMessage
from runtime.persist import type_name

__all__ = ["GATE_ERROR_DELAY_S", "Admission", "end_transition", "open_listeners", "started"]

log = structlog.get_logger("taskloom.worker")

#: How long a task waits in the broker when a gate cannot decide (plus jitter).
GATE_ERROR_DELAY_S = 1.0
#: The longest error message a transition carries.
_MAX_ERROR = 300
#: Failures reported as FAILED (the task ran and failed); every other reason is DEAD_LETTERED.
_FAILED = frozenset({Why.FAILED, Why.TIME_LIMIT})
_PHASES = {Kind.SUCCESS: Phase.SUCCEEDED, Kind.RETRY: Phase.RETRYING,
           Kind.REVOKED: Phase.REVOKED, Kind.EXPIRED: Phase.EXPIRED,
           Kind.DEFERRED: Phase.SCHEDULED}


def started(msg: TaskMessage, worker: str, at_ms: int) -> Transition:
    return Transition(id=msg.id, task=msg.task, queue=msg.queue, phase=Phase.STARTED,
                      at_ms=at_ms, attempt=msg.attempt, worker=worker,
                      parent_id=msg.parent_id or "", root_id=msg.root_id or "")


def end_transition(msg: TaskMessage | None, outcome: Outcome, worker: str, *,
                   message_id: str = "", queue: str = "") -> Transition | None:
    """The transition ``outcome`` of ``msg`` makes, once stored; None for the
    outcomes that end nothing (a replacement lives on under the same id, a
    duplicate ended before, a released delivery runs again)."""
    kind = outcome.kind
    at = now_ms()
    if kind is Kind.FAILURE or kind is Kind.DEAD_LETTER:
        reason = outcome.reason or Why.INTERNAL_ERROR
        phase = Phase.FAILED if kind is Kind.FAILURE and reason in _FAILED else \
            Phase.DEAD_LETTERED
    else:
        found = _PHASES.get(kind)
        if found is None:
            return None
        phase, reason = found, None
    info = outcome.info
    eta = at + int((outcome.delay_s or 0.0) * 1000) \
        if phase is Phase.RETRYING or phase is Phase.SCHEDULED else None
    if msg is None:  # not a task message: what the envelope says
        return Transition(id=message_id, task="", queue=queue, phase=phase, at_ms=at,
                          worker=worker, reason=reason.value if reason else "")
    return Transition(
        id=msg.id, task=msg.task, queue=msg.queue, phase=phase, at_ms=at, attempt=msg.attempt,
        worker=worker, eta_ms=eta, reason=reason.value if reason else "",
        error_type=info.type if info is not None and kind is not Kind.REVOKED else "",
        error=info.message[:_MAX_ERROR] if info is not None and kind is not Kind.REVOKED else "",
        parent_id=msg.parent_id or "", root_id=msg.root_id or "")


class Admission:
    """Asks the gates, in order, whether a task may run now."""

    __slots__ = ("_failing", "gates", "worker")

    def __init__(self, gates: Sequence[Gate], worker: str) -> None:
        self.gates = tuple(gates)
        self.worker = worker
        self._failing = False

    async def admit(self, msg: TaskMessage) -> tuple[list[Gate], float | None]:
        """The gates that admitted ``msg`` (to hear ``done()``) and, if one
        did not, the delay to wait in the broker (the gates that admitted
        it before have heard ``done()`` already)."""
        admitted: list[Gate] = []
        for gate in self.gates:
            try:
                delay = await gate.admit(msg)
            except Exception as e:
                if not self._failing:
                    self._failing = True
                    log.warning("an admission gate failed; deferring tasks until it answers "
                                "again (the next line says when)", gate=type(gate).__name__,
                                task_id=msg.id, task=msg.task, error_type=type_name(e),
                                error=str(e)[:_MAX_ERROR])
                delay = GATE_ERROR_DELAY_S * (1 + random.random())
            else:
                if self._failing and delay is None:
                    self._failing = False
                    log.warning("the admission gates answer again", gate=type(gate).__name__)
            if delay is not None:
                await self.done(admitted, msg)
                return [], max(0.0, float(delay))
            admitted.append(gate)
        return admitted, None

    @staticmethod
    async def done(gates: Sequence[Gate], msg: TaskMessage) -> None:
        for gate in gates:
            try:
                await gate.done(msg)
            except Exception as e:
                log.warning("an admission gate failed to release a task's permits (its "
                            "leases lapse instead)", gate=type(gate).__name__,
                            task_id=msg.id, error_type=type_name(e), error=str(e)[:_MAX_ERROR])


async def open_listeners(listeners: Sequence[Listener]) -> AsyncExitStack:
    """Run each listener's ``serve()`` in a task group of its own until the
    returned stack closes; closing cancels them, then ``aclose()``s each."""
    stack = AsyncExitStack()
    await stack.__aenter__()
    try:
        for listener in listeners:
            stack.push_async_callback(_close_listener, listener)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        for listener in listeners:
            tg.start_soon(_serve_listener, listener)
    except BaseException:
        await stack.aclose()
        raise
    return stack


async def _serve_listener(listener: Listener) -> None:
    try:
        await listener.serve()
    except Exception as e:  # it must not take the runtime (and the caller's code) down
        log.error("a lifecycle listener stopped serving", listener=type(listener).__name__,
                  error_type=type(e).__name__, exc_info=e)


async def _close_listener(listener: Listener) -> None:
    try:
        await listener.aclose()
    except Exception as e:
        log.error("a lifecycle listener failed to close", listener=type(listener).__name__,
                  error_type=type(e).__name__, exc_info=e)
