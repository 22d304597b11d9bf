"""The deliveries a Redis consumer has fetched and not yet handed out, and the
receivers waiting for them.

Waiting receivers are woken one at a time, not all at once: a receiver that
takes a delivery while more are left wakes the next waiting one, unless one
woken earlier has yet to run. So a batch of tasks that finish without
suspending costs a couple of wake-ups, not one per task (nor a wake-up of
every idle runner per batch), while a task that suspends lets the receiver
woken meanwhile take the next delivery at once: no delivery waits in here
while a receiver is idle for longer than one turn of the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["ReadyQueue"]

T = TypeVar("T")


class ReadyQueue(Generic[T]):
    """A FIFO of deliveries; :meth:`get` waits for one. ``on_empty`` is called
    when a :meth:`get` takes the last one (the consumer may fetch again)."""

    __slots__ = ("_items", "_on_empty", "_waiters", "_woken", "closed")

    def __init__(self, on_empty: Callable[[], None]) -> None:
        self._items: deque[T] = deque()
        self._waiters: deque[anyio.Event] = deque()
        self._woken = 0  # receivers woken that have not run yet
        self._on_empty = on_empty
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def append(self, item: T) -> None:
        """Add ``item``; call :meth:`announce` once the batch is in."""
        self._items.append(item)

    def announce(self) -> None:
        """Wake a waiting receiver for what was added (unless one is woken already)."""
        if self._items and not self._woken:
            self._wake()

    def _wake(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()
            self._woken += 1

    def clear(self) -> None:
        self._items.clear()

    def close(self) -> None:
        """Every :meth:`get`, waiting or to come, raises ``anyio.EndOfStream``."""
        self.closed = True
        self._woken += len(self._waiters)
        for event in self._waiters:
            event.set()
        self._waiters.clear()

    async def get(self) -> T:
        items = self._items
        while True:
            if self.closed:
                raise anyio.EndOfStream
            if items:
                item = items.popleft()
                if not items:
                    self._on_empty()
                elif not self._woken:
                    self._wake()  # the next one, for when this receiver is busy
                return item
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():
                    # woken but leaving (cancelled): pass the wake-up on
                    self._woken -= 1
                    if items and not self._woken:
                        self._wake()
                else:
                    self._waiters.remove(event)
                raise
            self._woken -= 1
