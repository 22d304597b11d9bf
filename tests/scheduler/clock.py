"""A clock the test moves by hand, for the scheduler's ``clock=``."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio


class FakeClock:
    """``now()`` stays put until ``advance``/``set``; ``sleep_until`` returns once
    the test has moved the time far enough."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._moved = anyio.Event()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        while self._now < when:
            await self._moved.wait()

    def set(self, when: datetime) -> None:
        self._now = when
        moved, self._moved = self._moved, anyio.Event()
        moved.set()

    def advance(self, by: timedelta | float) -> None:
        self.set(self._now + (by if isinstance(by, timedelta) else timedelta(seconds=by)))
