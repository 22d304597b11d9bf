"""Awaiting another task from inside a task (issue 13 item 9)."""

from __future__ import annotations

import anyio

from runtime import ResultTimeout, Runtime, current_task, run

LIMIT = 20.0  # bound on every wait


async def test_nested_run_does_not_hold_the_only_slot(rt: Runtime) -> None:
    @rt.task(queue="children")
    async def child(x: int) -> int:
        return x * 2

    @rt.task(queue="parents")
    async def parent(x: int) -> int:
        return await run(child.s(x)) + 1

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(queues=["parents", "children"], concurrency=1) as worker:
            assert await rt.run(parent.s(20), timeout=LIMIT) == 41
            handle = await rt.enqueue(parent.s(1))
            assert await handle.result(timeout=LIMIT) == 3
            await worker.idle()
            assert worker.processed == 4


async def test_nested_timeout_names_the_child(rt: Runtime) -> None:
    @rt.task(queue="nobody")
    async def orphan() -> None:
        return None

    @rt.task
    async def waits() -> str:
        try:
            await rt.run(orphan.s(), timeout=0.2)
        except ResultTimeout as e:
            return f"{e.task_id}|{e.task}|{e.waiter}|{e}"
        return "no timeout"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(queues=["default"]):
            handle = await rt.enqueue(waits.s())
            out = await handle.result(timeout=LIMIT)
    child_id, task, waiter, message = out.split("|")
    assert task == orphan.name and waiter == f"{waits.name} {handle.id}"
    assert child_id in message and orphan.name in message


async def test_context_is_the_parents_after_a_nested_run(rt: Runtime) -> None:
    @rt.task
    async def inner() -> str:
        return current_task().id

    @rt.task
    async def outer() -> tuple[str, str]:
        child_id = await run(inner.s())
        return child_id, current_task().id

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1):
            handle = await rt.enqueue(outer.s())
            child_id, own = await handle.result(timeout=LIMIT)
    assert own == handle.id and child_id != handle.id
