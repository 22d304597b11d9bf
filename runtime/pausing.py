"""Pausing: the seam through which a worker learns which of its queues are
paused (``runtime.ops.pauses`` keeps them; the core never imports it).

A worker given a :class:`PauseView` runs its ``watch()`` beside its consumer,
consumes only the queues for which ``is_paused`` is false, and on
``changed()`` closes its consumer (once the tasks it runs have finished, so
that what it prefetched goes back to the broker) and opens another on the
queues not paused. With every queue paused it takes nothing and waits for the
next change. Enqueue is never affected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import anyio
import anyio.abc

__all__ = ["Generation", "PauseView", "Selector"]


class PauseView(Protocol):
    def is_paused(self, queue: str, /) -> bool:
        """Whether ``queue`` is paused, from a local copy (no I/O)."""
        ...

    async def changed(self) -> None:
        """Return at the next pause or resume."""
        ...

    async def watch(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Keep ``is_paused`` current until cancelled (started once loaded)."""
        ...


class Generation:
    """The runners of one consumer; ``closing`` once the queues to consume changed."""

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False


class Selector:
    """Which of a worker's ``queues`` to consume now: those ``view`` says are
    not paused (all of them without a view)."""

    def __init__(self, queues: Sequence[str], view: PauseView | None) -> None:
        self.queues = list(queues)
        self.view = view

    def active(self) -> list[str]:
        view = self.view
        return self.queues if view is None else [q for q in self.queues
                                                 if not view.is_paused(q)]

    async def change_from(self, active: list[str]) -> None:
        """Return once the queues to consume are no longer ``active`` (never
        without a view)."""
        view = self.view
        if view is None:
            await anyio.sleep_forever()
            return
        while self.active() == active:
            await view.changed()
