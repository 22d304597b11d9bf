"""Pause and resume seen by another process's view: a watcher (what a worker runs)
learns of each change by notification, and after it reconnects."""

from __future__ import annotations

import anyio

from runtime.ops.pauses import MemoryPauses, RedisPauses
from tests.conftest import REDIS_URL

LIMIT = 20.0  # generous: a loaded 2-core machine


async def test_a_watcher_sees_pause_and_resume_from_elsewhere(kind: str, namespace: str) -> None:
    if kind == "memory":
        worker_view = operator = MemoryPauses()
    else:
        worker_view, operator = (RedisPauses(REDIS_URL, namespace=namespace),
                                 RedisPauses(REDIS_URL, namespace=namespace))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker_view.watch)
            assert not worker_view.is_paused("q")
            with anyio.fail_after(LIMIT):
                async with anyio.create_task_group() as waiters:
                    waiters.start_soon(worker_view.changed)
                    await anyio.sleep(0.05)
                    assert await operator.set_paused("q", True)
                while not worker_view.is_paused("q"):
                    await worker_view.changed()
                assert not worker_view.is_paused("other")
                assert await operator.set_paused("q", False)
                while worker_view.is_paused("q"):
                    await worker_view.changed()
            tg.cancel_scope.cancel()
        assert await operator.paused() == set()
    finally:
        await worker_view.aclose()
        await operator.aclose()
