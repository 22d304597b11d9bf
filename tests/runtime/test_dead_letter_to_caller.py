"""A caller whose task was dead-lettered learns it at once, as ``TaskDeadLettered``
naming the reason, instead of waiting for ``ResultTimeout`` (issue 12, item 2).

Each test catches the way a user does: ``except TaskDeadLettered:`` OUTSIDE every
context manager the library provides. The wait is given a timeout far longer than
the test's ``fail_after`` bound, so only an at-once answer passes.

A producer that does not have the task's code sends it by name by declaring a
stub under that name (``rt.signature(name)`` looks the name up in the producer's
own registry); the worker's runtime here does not register it at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from brokers.memory import MemoryBroker
from runtime import Reject, Runtime, TaskDeadLettered, TaskError, run
from runtime.results.memory import MemoryResultStore
from tests.conftest import REDIS_URL
from tests.runtime.helpers import LIMIT, dead_letters

#: far longer than LIMIT: a caller that waits for its timeout fails the test's bound
LONG_WAIT = 600.0


@asynccontextmanager
async def pair(kind: str, namespace: str) -> AsyncIterator[tuple[Runtime, Runtime]]:
    """A producer runtime and a separate worker runtime on one broker and result store."""
    if kind == "memory":
        broker, results = MemoryBroker(), MemoryResultStore()
        yield Runtime(broker=broker, results=results), Runtime(broker=broker, results=results)
        return
    producer = Runtime(broker=REDIS_URL, namespace=namespace)
    worker = Runtime(broker=REDIS_URL, namespace=namespace)
    try:
        yield producer, worker
    finally:
        async with worker:
            await worker.broker.purge_namespace()  # type: ignore[attr-defined]
            await worker.results.purge_namespace()  # type: ignore[attr-defined]


KINDS = [pytest.param("memory"), pytest.param("redis", marks=pytest.mark.redis)]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_task_the_worker_does_not_have_raises_unknown_task_at_once(
        kind: str, namespace: str) -> None:
    async with pair(kind, namespace) as (producer, worker_rt):

        @producer.task(name="tasks.nope")
        async def nope(x: int) -> int:  # a stub: the producer never runs it
            raise NotImplementedError

        @worker_rt.task(name="tasks.other")
        async def other() -> None:
            return None

        sig = producer.signature("tasks.nope", 1)
        try:
            with anyio.fail_after(LIMIT):
                async with producer, worker_rt, worker_rt.worker():
                    await run(sig, timeout=LONG_WAIT)
        except TaskDeadLettered as e:
            caught = e
        else:
            raise AssertionError("run() of an unknown task returned")
        assert caught.reason == "unknown_task"
        assert "unknown_task" in str(caught) and "tasks.nope" in str(caught)
        async with worker_rt:
            assert [reason for _, reason in await dead_letters(worker_rt)] == ["unknown_task"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_rejecting_task_raises_rejected_at_once(kind: str, namespace: str) -> None:
    async with pair(kind, namespace) as (_, rt):

        @rt.task(name="tasks.picky")
        async def picky(x: int) -> int:
            raise Reject(f"{x} can never work")

        try:
            with anyio.fail_after(LIMIT):
                async with rt, rt.worker():
                    handle = await rt.enqueue(picky.s(7))
                    await handle.result(timeout=LONG_WAIT)
        except TaskDeadLettered as e:
            caught = e
        else:
            raise AssertionError("result() of a rejected task returned")
        assert caught.reason == "rejected"
        assert "7 can never work" in str(caught)


async def test_an_unencodable_result_raises_bad_result_at_once() -> None:
    rt = Runtime()

    @rt.task(name="tasks.opaque")
    async def opaque() -> Any:
        return object()

    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                await run(opaque.s(), timeout=LONG_WAIT)
    except TaskDeadLettered as e:
        assert e.reason == "bad_result"
    else:
        raise AssertionError("run() of a task with an unencodable result returned")


async def test_a_plain_failure_is_not_dead_lettered_to_the_caller() -> None:
    rt = Runtime()

    @rt.task(name="tasks.boom")
    async def boom() -> None:
        raise KeyError("boom")

    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                await run(boom.s(), timeout=LONG_WAIT)
    except TaskError as e:
        assert not isinstance(e, TaskDeadLettered)
        assert e.info.reason == "failed"
    else:
        raise AssertionError("run() of a failing task returned")
