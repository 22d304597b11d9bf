"""Helpers for the runtime suite: no sleeps, every wait bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from brokers.base import QueueStats
from runtime import Runtime

#: The bound on every test's waiting (anyio.fail_after); work here takes milliseconds.
LIMIT = 10.0


@asynccontextmanager
async def purged(rt: Runtime) -> AsyncIterator[None]:
    """Remove the runtime's namespace from Redis (broker and results) afterwards."""
    try:
        yield
    finally:
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]


async def dead_letters(rt: Runtime, queue: str = "default") -> list[tuple[str, str]]:
    """(message id, reason) of every dead letter in ``queue``."""
    return [(d.envelope.id, d.reason) for d in await rt.broker.dead_letters(queue)]


async def stats(rt: Runtime, queue: str = "default") -> QueueStats:
    return await rt.broker.stats(queue)


class Counter:
    """Counts calls and remembers their arguments."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        return len(self.calls)

    @property
    def n(self) -> int:
        return len(self.calls)
