"""What the worker decides about a delivery before running it: the task
message it carries (or the dead letter it makes), and whether it is to run at
all (unknown task, cancelled, expired). Pure decisions plus a log line; the
worker concludes them on its one settle path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from brokers.base import Delivery
from runtime.codec import Codec
from runtime.deadletters import DeadLetterReason as Why
from runtime.encryption import DecryptError
from runtime.errors import DecodeError
from runtime.flow import Kind, Outcome, now_ms
from runtime.judging import message_id
from runtime.judging import reason as _reason
from runtime.lifecycle import Transition
from runtime.messages import ErrorInfo, TaskMessage, check_references
from runtime.registry import Task
from runtime.seams import end_transition

__all__ = ["MAX_ID_IN_LOG", "decode", "report", "screen", "settle"]

log = structlog.get_logger("taskloom.worker")

#: Longest message id (set by whoever published) written to a log line.
MAX_ID_IN_LOG = 200


def decode(codec: Codec, delivery: Delivery
           ) -> TaskMessage | tuple[TaskMessage | None, Outcome]:
    """The task message of ``delivery``, or what to conclude instead: the
    dead letter it makes, and the message to record that failure under when
    its id can be trusted (an encrypted message the worker cannot read,
    whose id a verified signature vouches for: its caller learns at once)."""
    env = delivery.envelope
    try:
        msg = codec.decode(env.body, env.headers)
    except DecodeError as e:
        log.error("dead-lettering an undecodable message", message_id=message_id(delivery),
                  reason=e.reason, error=str(e)[:300])
        why = _reason(e.reason, Why.DECODE_ERROR)
        if isinstance(e, DecryptError) and e.authenticated and e.task_id:
            info = ErrorInfo(type="DecryptError", reason=why.value, message=str(e))
            return TaskMessage(id=e.task_id, task=""), Outcome.failure(info)
        return None, Outcome(kind=Kind.DEAD_LETTER, reason=why)
    wrong = check_references(msg)
    if wrong is not None:
        log.error("dead-lettering a message whose canvas references do not hold",
                  task_id=msg.id, task=msg.task[:MAX_ID_IN_LOG], error=wrong[:300])
        return None, Outcome(kind=Kind.DEAD_LETTER, reason=Why.BAD_MESSAGE)
    return msg


def screen(msg: TaskMessage, task: Task[Any, Any] | None, revoked: Callable[[str], bool],
           worker: str) -> Outcome | None:
    """What becomes of ``msg`` without running it (unknown task, cancelled,
    expired), or None if it is to run."""
    if task is None:
        log.error("dead-lettering a message for an unknown task", task_id=msg.id,
                  task=msg.task[:MAX_ID_IN_LOG])
        return Outcome.failure(ErrorInfo(
            type="UnknownTaskError", reason=Why.UNKNOWN_TASK.value,
            message=f"no task named {msg.task!r} is registered on worker {worker}"))
    if revoked(msg.id) or (msg.downstream and any(revoked(i) for i in msg.downstream)):
        log.info("skipping a cancelled task", task_id=msg.id, task=msg.task)
        return Outcome(kind=Kind.REVOKED, info=ErrorInfo(
            type="TaskCancelled", reason="cancelled",
            message="the task (or the canvas it belongs to) was cancelled"))
    if msg.expires_ms is not None and now_ms() > msg.expires_ms:
        log.info("discarding an expired task", task_id=msg.id, task=msg.task)
        return Outcome(kind=Kind.EXPIRED, info=ErrorInfo(
            type="Expired", reason="expired", message="the task expired before it ran"))
    return None


#: The outcomes settled by dead-lettering the message.
_DEAD = (Kind.FAILURE, Kind.DEAD_LETTER)


async def settle(delivery: Delivery, outcome: Outcome) -> None:
    """The one place a delivery is settled (``Worker._conclude`` calls it)."""
    kind = outcome.kind
    if kind in _DEAD:
        reason = outcome.reason  # a DeadLetterReason member (typed so)
        assert reason is not None
        await delivery.dead_letter(reason)
    elif kind is Kind.RELEASE:
        await delivery.nack(delay_s=outcome.delay_s or 0.0)
    else:
        await delivery.ack()


def report(transition: Callable[[Transition], None], worker: str, delivery: Delivery,
           msg: TaskMessage | None, outcome: Outcome) -> None:
    """Tell the listeners how ``msg`` ended (stored, not yet settled)."""
    queue = ""
    if msg is None:
        try:
            queue = str(delivery.envelope.queue)[:MAX_ID_IN_LOG]
        except Exception:
            queue = ""
    t = end_transition(msg, outcome, worker, message_id=message_id(delivery), queue=queue)
    if t is not None:
        transition(t)
