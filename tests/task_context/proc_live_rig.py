"""A runtime on memory or on the shared Redis carrying the tasks of
``proc_live_app`` (the pool processes import that module's own runtime)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread
import pytest

from brokers.base import ConnectionFailed
from runtime import Runtime
from tests.conftest import REDIS_URL, server_missing
from tests.task_context import proc_live_app

APP = "tests.task_context.proc_live_app:rt"
#: bound on each wait; pool processes import the app fresh (seconds on a loaded machine)
LIMIT = 60.0
KINDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


async def runtime_on(kind: str, namespace: str) -> AsyncIterator[Runtime]:
    """For a fixture: the runtime (not opened), cleaned up after on Redis."""
    runtime = Runtime() if kind == "memory" else Runtime(broker=REDIS_URL, namespace=namespace)
    for task in proc_live_app.rt.registry:
        runtime.registry.add(task)
    if kind == "memory":
        yield runtime
        return
    try:
        async with runtime:
            pass
    except ConnectionFailed as e:
        server_missing("redis", e)
    yield runtime
    from runtime.results.redis import RedisResultStore

    async with runtime:
        await runtime.broker.purge_namespace()  # type: ignore[attr-defined]
        if isinstance(runtime.results, RedisResultStore):
            await runtime.results.purge_namespace()


def make_fifo(tmp_path: Path, name: str = "go") -> Path:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    return fifo


async def release(fifo: Path, text: str = "go") -> None:
    """Let a body blocked on ``fifo`` go on (the write blocks until it has opened it)."""
    await anyio.to_thread.run_sync(fifo.write_text, text, abandon_on_cancel=True)


async def heard(fifo: Path) -> str:
    """What a body writes to ``fifo`` (blocks until it has written and closed it)."""
    return await anyio.to_thread.run_sync(fifo.read_text, abandon_on_cancel=True)
