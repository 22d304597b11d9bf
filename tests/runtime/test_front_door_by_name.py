"""Sending by name without the task's code (issue 12, item 4): a producer that
registers nothing builds a sendable signature with ``rt.signature(name, ...)``;
where the name IS registered, its arguments are checked as ``task.s()``'s are. A
worker without the task dead-letters it as ``unknown_task``, which reaches the
caller at once as ``TaskDeadLettered``. Each test has a real worker and a
producer ``Runtime`` that registers nothing; errors are caught outside every
context manager the library provides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from brokers.memory import MemoryBroker
from runtime import ArgumentsError, Runtime, TaskDeadLettered, chain, run
from runtime.results import MemoryResultStore
from tests.canvas.conftest import BROKERS, make_runtime, purge
from tests.runtime.helpers import LIMIT, dead_letters, stats

#: far longer than LIMIT: a caller that waits for its timeout fails the test's bound
LONG_WAIT = 600.0


@asynccontextmanager
async def pair(kind: str, namespace: str) -> AsyncIterator[tuple[Runtime, Runtime]]:
    """A producer that registers nothing and a worker runtime, one app."""
    if kind == "memory":
        broker, results = MemoryBroker(), MemoryResultStore()
        yield Runtime(broker=broker, results=results), Runtime(broker=broker, results=results)
        return
    producer, worker = make_runtime(kind, namespace), make_runtime(kind, namespace)
    try:
        yield producer, worker
    finally:
        await purge(producer)
        await purge(worker)


def worker_tasks(rt: Runtime) -> None:
    @rt.task(name="tasks.add")
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(name="tasks.double")
    async def double(x: int) -> int:
        return 2 * x


@pytest.mark.parametrize("kind", BROKERS)
async def test_a_producer_without_the_code_sends_a_task_by_name(
        kind: str, namespace: str) -> None:
    async with pair(kind, namespace) as (producer, worker_rt):
        worker_tasks(worker_rt)
        assert len(producer.registry) == 0
        with anyio.fail_after(LIMIT):
            async with producer, worker_rt, worker_rt.worker():
                assert await run(producer.signature("tasks.add", 1, 2)) == 3
                assert await producer.run(producer.signature("tasks.add", x=2, y=5)) == 7
                handle = await producer.enqueue(
                    chain(producer.signature("tasks.add", 3, 4), producer.signature("tasks.double")))
                assert await handle.result() == 14
        assert len(producer.registry) == 0  # a stand-in is never registered


@pytest.mark.parametrize("kind", BROKERS)
async def test_a_name_no_worker_has_reaches_the_caller_as_unknown_task(
        kind: str, namespace: str) -> None:
    async with pair(kind, namespace) as (producer, worker_rt):
        worker_tasks(worker_rt)
        sig = producer.signature("tasks.nope", 1)  # nobody has it: not checked here
        try:
            with anyio.fail_after(LIMIT):
                async with producer, worker_rt, worker_rt.worker():
                    await run(sig, timeout=LONG_WAIT)
        except TaskDeadLettered as e:
            caught = e
        else:
            raise AssertionError("run() of a task no worker has returned")
        assert caught.reason == "unknown_task"
        assert "unknown_task" in str(caught) and "tasks.nope" in str(caught)
        if kind != "amqp":  # RabbitMQ's dead letters are read through its own tools
            async with worker_rt:
                assert [reason for _, reason in await dead_letters(worker_rt)] == ["unknown_task"]


async def test_a_registered_name_is_checked_like_task_s() -> None:
    rt = Runtime()
    worker_tasks(rt)
    for bad in (rt.signature("tasks.add", "x", 2), rt.signature("tasks.add", 1),
                rt.signature("tasks.add", 1, 2, z=3)):
        try:
            async with rt:
                await rt.enqueue(bad)
        except ArgumentsError:
            pass
        else:
            raise AssertionError(f"{bad!r} was accepted")
    async with rt:
        assert (await stats(rt)).ready == 0  # nothing sent


async def test_a_runtime_with_a_worker_does_not_run_a_name_it_only_sent() -> None:
    rt = Runtime()  # sends "tasks.elsewhere" by name and runs a worker, without the task
    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                await run(rt.signature("tasks.elsewhere"), timeout=LONG_WAIT)
    except TaskDeadLettered as e:
        assert e.reason == "unknown_task"
    else:
        raise AssertionError("a stand-in was run as if it were the task")
