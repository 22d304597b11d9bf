"""Pause and resume through ``rt.ops`` reach the embedded ``rt.worker()``."""

from __future__ import annotations

import anyio

from runtime import Runtime


async def test_rt_ops_pause_holds_the_embedded_worker_until_resume() -> None:
    rt = Runtime()
    ran: list[int] = []

    @rt.task(queue="a")
    async def held(i: int) -> int:
        ran.append(i)
        return i

    @rt.task(queue="b")
    async def free(i: int) -> int:
        return i

    async with rt, rt.worker():
        assert await rt.ops.pause("a")
        # a pause is seen by workers at their next scheduling point, not inside pause()
        await anyio.sleep(0.2)
        handle = await rt.enqueue(held.s(1))
        with anyio.fail_after(10):
            assert await rt.enqueue(free.s(2)) and await (await rt.enqueue(free.s(3))).result() == 3
        assert ran == []  # b ran while a waited
        assert await rt.ops.resume("a")
        with anyio.fail_after(10):
            assert await handle.result() == 1
    assert ran == [1]
