"""Helpers for testing code that uses taskloom.

    from runtime.testing import running

    async def test_add() -> None:
        async with running(rt) as worker:
            handle = await rt.enqueue(add.s(1, 2))
            await worker.idle()                       # burst: until nothing is left to do
            assert await handle.result(timeout=1) == 3
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from runtime.app import Runtime
from runtime.worker import Worker

__all__ = ["running"]


@asynccontextmanager
async def running(
    rt: Runtime,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int = 10,
    shutdown_grace_s: float = 5.0,
) -> AsyncIterator[Worker]:
    """Connect ``rt`` and run an embedded worker for the duration of the block.

    With the default ``Runtime()`` (memory broker and results) nothing leaves
    the process and the worker exercises the real settlement path: late ack,
    retries, dead letters, redelivery.
    """
    async with rt, rt.worker(queues=queues, concurrency=concurrency,
                             shutdown_grace_s=shutdown_grace_s) as worker:
        yield worker
