"""A task's place in its canvas (chain, group, chord): its parent, its root, the
tasks it started (children) and every task under the same root (members).

The task index keeps ``parent_id`` and ``root_id`` in each task's summary but has
no set by root or parent, so this reads the index's own listing, newest first,
from the root's enqueue time on, and keeps the tasks that name this one as
parent or share its root. A canvas runs after its root is enqueued, so nothing
of it is older than that; the scan stops after ``SCAN_MAX`` summaries and then
says ``complete: false`` (a busy index between the root and now). A set per
root in the index (see the dashboard's README section) makes this exact.

What the index records: a chain step's parent is the step before it and its
root the first step; a group or chord started inside a chain has the step
before it as parent; a chord's body has as parent the header task that
completed the join. Members of a group started on its own are roots of their
own (nothing links them in the index).
"""

from __future__ import annotations

from typing import Any

from runtime.dashboard.source import display_state
from runtime.ops.api import Operations
from runtime.ops.index import TaskSummary

__all__ = ["SCAN_MAX", "family"]

#: summaries read at most to find a task's children and canvas members
SCAN_MAX = 5_000
_PAGE = 500


def _row(s: TaskSummary) -> dict[str, Any]:
    return {"id": s.id, "name": s.name, "state": display_state(s.state.value),
            "phase": s.state.value, "queue": s.queue, "parent_id": s.parent_id,
            "root_id": s.root_id, "at_ms": s.at_ms, "enqueued_ms": s.enqueued_ms,
            "link": f"#/task/{s.id}"}


def _oldest_first(row: dict[str, Any]) -> tuple[int, str]:
    return int(row["enqueued_ms"] or row["at_ms"]), str(row["id"])


async def family(ops: Operations, task_id: str, *, scan_max: int = SCAN_MAX
                 ) -> dict[str, Any] | None:
    """``{id, parent, root, children, members, complete, scanned}`` of ``task_id``
    (None when the index does not know it). ``parent``/``root`` are rows (or None
    when unknown to the index; their ids are in ``parent_id``/``root_id``);
    ``children`` have this task as parent; ``members`` share its root (the root
    excluded, this task included), oldest first."""
    me = await ops.task(task_id)
    if me is None:
        return None
    root_id = me.root_id or me.id
    root = me if root_id == me.id else await ops.task(root_id)
    parent = await ops.task(me.parent_id) if me.parent_id else None
    anchor = root if root is not None else me
    since = anchor.enqueued_ms or anchor.started_ms or anchor.at_ms
    children: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    # without the root's summary (trimmed from the index) the scan starts at this task:
    # members older than it may be missing, so it cannot say it saw them all
    scanned, cursor, complete = 0, None, root is not None
    while True:
        page = await ops.tasks(since_ms=since, limit=min(_PAGE, scan_max), cursor=cursor)
        for s in page.items:
            if s.id == root_id:
                continue
            if s.parent_id == task_id:
                children.append(_row(s))
            if s.root_id == root_id:
                members.append(_row(s))
        scanned += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
        if scanned >= scan_max:
            complete = False
            break
    children.sort(key=_oldest_first)
    members.sort(key=_oldest_first)
    return {"id": task_id, "parent_id": me.parent_id, "root_id": root_id,
            "parent": _row(parent) if parent is not None else None,
            "root": _row(root) if root is not None else None,
            "children": children, "members": members, "complete": complete,
            "scanned": scanned}
