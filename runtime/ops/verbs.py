"""The operator's verbs: retry, replay and purge dead letters, cancel by filter.

Each is idempotent and returns what it did, in counts:

- ``retry(id)``: the dead letter of a failed or dead-lettered task is published
  again as a new attempt under the id ``retry_id(id)`` (derived from the
  original, so two operators retrying at once publish the same id), with the
  same arguments and the header ``taskloom-retry-of: <id>``; its dead letter is
  then removed. Retrying again finds no dead letter and the retry already known:
  nothing is sent.
- ``replay(queue, filter)``: the same for every dead letter of ``queue`` that
  matches ``filter`` (reason, task name, time range); ``dry_run`` only counts.
- ``purge_dead(queue, filter)``: removes the matching dead letters.
- ``cancel(ids | name | queue)``: revokes (through the result store, as
  ``TaskHandle.cancel()`` does) every listed task, or every pending task
  (enqueued, scheduled, retrying) of a task name or queue found in the index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from runtime.errors import DecodeError, TaskloomError
from runtime.lifecycle import Phase, Transition
from runtime.messages import TaskMessage
from runtime.ops.common import now_ms
from runtime.ops.deadletters import DeadEntry, admin_for
from runtime.ops.index import Query, TaskIndex

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["RETRY_OF", "CancelReport", "DeadFilter", "DeadReport", "NothingToRetry",
           "RetryReport", "cancel", "purge_dead", "replay", "retry", "retry_id"]

#: The header a retried task carries: the id it retries.
RETRY_OF = "taskloom-retry-of"
PENDING = (Phase.ENQUEUED, Phase.SCHEDULED, Phase.RETRYING)


class NothingToRetry(TaskloomError):
    """The task has no dead letter to run again."""

    def __init__(self, task_id: str, why: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} cannot be retried: {why}")


class DeadFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead letters: every field set must match (None: any)."""

    reason: str | None = None
    task: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    ids: tuple[str, ...] | None = None
    #: at most this many (the oldest first)
    limit: int | None = None


class DeadReport(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    matched: int = 0
    #: published again (replay) or removed (purge)
    done: int = 0
    #: matched but not replayable: the body is not a task message this runtime reads
    undecodable: int = 0
    dry_run: bool = False


class RetryReport(msgspec.Struct, frozen=True, kw_only=True):
    original: str
    new_id: str
    #: False when it was already retried (nothing was sent this time)
    retried: bool


class CancelReport(msgspec.Struct, frozen=True, kw_only=True):
    matched: int = 0
    revoked: int = 0
    #: already finished or already cancelled: nothing to do
    unchanged: int = 0


def retry_id(task_id: str) -> str:
    """The id of the retry of ``task_id`` (within the 200-byte limit)."""
    digest = hashlib.sha1(task_id.encode()).hexdigest()[:10]
    return f"{task_id[:180]}~r{digest}"


def _again(msg: TaskMessage) -> TaskMessage:
    return msgspec.structs.replace(
        msg, id=retry_id(msg.id), attempt=1, eta_ms=None, expires_ms=None,
        headers={**msg.headers, RETRY_OF: msg.id})


def _decode(rt: Runtime, e: DeadEntry) -> TaskMessage | None:
    env = e.letter.envelope
    try:
        return rt.codec.decode(env.body, env.headers)
    except DecodeError:
        return None


def _matches(rt: Runtime, e: DeadEntry, f: DeadFilter) -> tuple[bool, TaskMessage | None]:
    if f.ids is not None and e.letter.envelope.id not in f.ids:
        return False, None
    if f.reason is not None and e.letter.reason != f.reason:
        return False, None
    if (f.since_ms is not None or f.until_ms is not None) and e.at_ms is None:
        return False, None
    if f.since_ms is not None and e.at_ms is not None and e.at_ms < f.since_ms:
        return False, None
    if f.until_ms is not None and e.at_ms is not None and e.at_ms > f.until_ms:
        return False, None
    msg = _decode(rt, e)
    if f.task is not None and (msg is None or msg.task != f.task):
        return False, None
    return True, msg


async def replay(rt: Runtime, queue: str, f: DeadFilter | None = None, *,
                 dry_run: bool = False) -> DeadReport:
    admin = admin_for(rt.broker)
    chosen: list[tuple[DeadEntry, TaskMessage | None]] = []
    for e in await admin.entries(queue):
        ok, msg = _matches(rt, e, f or DeadFilter())
        if ok:
            chosen.append((e, msg))
    if f is not None and f.limit is not None:
        chosen = chosen[:f.limit]
    undecodable = sum(1 for _, m in chosen if m is None)
    if dry_run:
        return DeadReport(queue=queue, matched=len(chosen), undecodable=undecodable,
                          dry_run=True)
    done = 0
    runnable = [(e, m) for e, m in chosen if m is not None]
    for i in range(0, len(runnable), 500):
        batch = runnable[i:i + 500]
        await rt.publish([_again(m) for _, m in batch])
        done += await admin.remove(queue, [e.key for e, _ in batch])
    return DeadReport(queue=queue, matched=len(chosen), done=done, undecodable=undecodable)


async def purge_dead(rt: Runtime, queue: str, f: DeadFilter | None = None, *,
                     dry_run: bool = False) -> DeadReport:
    admin = admin_for(rt.broker)
    keys = [e.key for e in await admin.entries(queue) if _matches(rt, e, f or DeadFilter())[0]]
    if f is not None and f.limit is not None:
        keys = keys[:f.limit]
    if dry_run:
        return DeadReport(queue=queue, matched=len(keys), dry_run=True)
    return DeadReport(queue=queue, matched=len(keys), done=await admin.remove(queue, keys))


async def retry(rt: Runtime, index: TaskIndex | None, task_id: str, *,
                queue: str | None = None) -> RetryReport:
    new_id = retry_id(task_id)
    queues: list[str] = [queue] if queue else []
    if not queues and index is not None:
        summary = await index.get(task_id)
        if summary is not None:
            queues = [summary.queue]
    if not queues:
        queues = sorted(set(rt.registry.queues()) | {rt.default_queue})
    admin = admin_for(rt.broker)
    for q in queues:
        for e in await admin.entries(q):
            if e.letter.envelope.id != task_id:
                continue
            msg = _decode(rt, e)
            if msg is None:
                raise NothingToRetry(task_id, f"its dead letter ({e.letter.reason}) is not a "
                                     "task message this runtime can read; purge it instead")
            await rt.publish([_again(msg)])
            await admin.remove(q, [e.key])
            return RetryReport(original=task_id, new_id=new_id, retried=True)
    known = await rt.results.get(new_id) is not None or (
        index is not None and await index.get(new_id) is not None)
    if known:
        return RetryReport(original=task_id, new_id=new_id, retried=False)
    raise NothingToRetry(task_id, f"no dead letter of it is kept on queue(s) {queues}: only a "
                         "failed or dead-lettered task whose dead letter is still kept can be "
                         "retried (pass queue= if it ran on another queue)")


async def cancel(rt: Runtime, index: TaskIndex | None, *, ids: Sequence[str] = (),
                 name: str | None = None, queue: str | None = None,
                 limit: int = 100_000) -> CancelReport:
    targets = list(dict.fromkeys(ids))
    if name is not None or queue is not None:
        if index is None:
            raise TaskloomError("cancel by name or queue needs the task index: open the "
                                "runtime with the index on, or cancel by id")
        cursor = None
        while len(targets) < limit:
            page = await index.query(Query(states=PENDING, name=name, queue=queue, limit=500,
                                           cursor=cursor))
            targets += [s.id for s in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        targets = list(dict.fromkeys(targets))[:limit]
    revoked = 0
    for task_id in targets:
        if await rt.results.revoke(task_id):
            revoked += 1
            if index is not None:
                s = await index.get(task_id)
                if s is not None:
                    index.transition(Transition(id=task_id, task=s.name, queue=s.queue,
                                                phase=Phase.REVOKED, at_ms=now_ms(),
                                                attempt=s.attempt, reason="cancelled"))
    if index is not None:
        await index.flush()
    return CancelReport(matched=len(targets), revoked=revoked, unchanged=len(targets) - revoked)
