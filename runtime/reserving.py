"""Idempotent task ids: ``enqueue(task_id=...)`` reserves the id in the result
store before it publishes, atomically (promise 10 of ``runtime.results.base``).

An explicit id that already has a record (pending, running, finished within the
result TTL, cancelled) is not sent again: the caller gets a handle to the
existing task with ``handle.duplicate`` set. Generated ids are never reserved
(they are new by construction), so the plain enqueue path does no extra work.

When the publish fails, the reservation is released, so that enqueuing the
same id again sends it (at least once). If the result store cannot be reached
to release it either, this runtime remembers the id and does not treat its own
stale reservation as a duplicate on the next try; another process would, until
the reservation expires with the result TTL. When the store cannot be reached
to reserve, the enqueue goes ahead without the check (it depends on the broker
alone), as it did before reservations.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from brokers.base import BrokerConnectionError
from runtime.errors import EnqueueError, ResultError
from runtime.handle import TaskHandle
from runtime.messages import TaskMessage

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["Call", "checked_ids", "send_reserved"]

log = structlog.get_logger("taskloom.runtime")

#: the messages of one enqueued target, its handle, and its explicit id (or None)
Call = tuple[list[TaskMessage], TaskHandle[Any], str | None]
Dedupe = Callable[[list[TaskMessage], TaskHandle[Any]],
                  Awaitable[tuple[list[TaskMessage], TaskHandle[Any]]]]

#: ids whose reservation this runtime could not release after a failed publish
_STUCK: weakref.WeakKeyDictionary[Runtime, set[str]] = weakref.WeakKeyDictionary()
_STUCK_MAX = 10_000


def checked_ids(count: int, task_ids: Sequence[str | None] | None, *,
                paced: bool = False) -> list[str | None]:
    """One id (or None) per target of ``enqueue_many``, each valid (EnqueueError)."""
    from runtime.wiring import check_task_id

    if paced and task_ids is not None:
        raise EnqueueError("enqueue_many takes rate= or task_ids=, not both")
    ids: list[str | None] = [None] * count if task_ids is None else list(task_ids)
    if len(ids) != count:
        raise EnqueueError(f"enqueue_many got {len(ids)} task_ids for {count} targets; "
                           "give one per target (None for a generated id)")
    for task_id in ids:
        if task_id is not None:
            check_task_id(task_id)
    return ids


async def _reserve(rt: Runtime, ids: list[str]) -> list[bool]:
    """Whether each id is free to send: reserved now, or reserved by this
    runtime before a publish that failed."""
    try:
        free = await rt.results.reserve(ids)
    except (ResultError, BrokerConnectionError) as e:
        log.warning("cannot reserve the task ids in the result store; enqueuing them "
                    "without the duplicate check", task_ids=ids[:10], error=str(e))
        return [True] * len(ids)
    stuck = _STUCK.get(rt)
    if stuck:
        free = [ok or task_id in stuck for ok, task_id in zip(free, ids, strict=True)]
    return free


async def _release(rt: Runtime, ids: list[str]) -> None:
    # remembered whatever the release does: a release that succeeded can still
    # be rolled back (a Redis killed before its AOF write), and a retry of this
    # runtime must not find its own reservation and send nothing
    stuck = _STUCK.setdefault(rt, set())
    if len(stuck) + len(ids) > _STUCK_MAX:
        stuck.clear()
    stuck.update(ids)
    with anyio.CancelScope(shield=True):
        try:
            await rt.results.release(ids)
        except (ResultError, BrokerConnectionError) as e:
            log.error("the publish failed and the task ids stay reserved in the result store "
                      "until their TTL; this runtime may enqueue them again, other processes "
                      "will see duplicates", task_ids=ids[:10], error=str(e))


async def send_reserved(rt: Runtime, calls: Sequence[Call], *,
                        dedupe: Dedupe | None = None) -> list[TaskHandle[Any]]:
    """Publish the messages of ``calls`` in one batch, after reserving their
    explicit ids in one round trip; a call whose id is taken publishes nothing
    and its handle gets ``duplicate``. ``dedupe`` (``unique_for``/``debounce``)
    may then drop a call, which releases its id. Returns the handles."""
    ids = [task_id for _, _, task_id in calls if task_id is not None]
    free = iter(await _reserve(rt, ids) if ids else [])
    out: list[TaskMessage] = []
    handles: list[TaskHandle[Any]] = []
    reserved: list[str] = []
    dropped: list[str] = []
    for msgs, first, task_id in calls:
        if task_id is not None:
            if not next(free):
                first.duplicate = True
                handles.append(first)
                continue
            reserved.append(task_id)
        messages, handle = (msgs, first) if dedupe is None else await dedupe(msgs, first)
        if task_id is not None and not messages:
            dropped.append(task_id)
        out.extend(messages)
        handles.append(handle)
    if dropped:
        await _release(rt, dropped)
    try:
        await rt.publish(out)
    except BaseException:
        if reserved:
            await _release(rt, [t for t in reserved if t not in dropped])
        raise
    stuck = _STUCK.get(rt)
    if stuck and reserved:
        stuck.difference_update(reserved)
    return handles
