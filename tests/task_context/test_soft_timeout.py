"""soft_timeout (issue 13 item 6): SoftTimeLimitExceeded inside the task, before the hard limit."""

from __future__ import annotations

import time

import anyio
import pytest

from runtime import ConfigError, Runtime, TaskTimeLimitExceeded, current_task
from runtime.errors import SoftTimeLimitExceeded

LIMIT = 20.0  # bound on every wait


async def test_soft_limit_is_catchable_in_an_async_task(rt: Runtime) -> None:
    cleaned: list[str] = []

    @rt.task(soft_timeout=0.2, timeout=10)
    async def slow() -> str:
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            await anyio.sleep(0.01)  # cleanup may await: the task is not cancelled
            cleaned.append("cleaned")
            return "partial"
        return "full"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await rt.run(slow.s()) == "partial"
    assert cleaned == ["cleaned"]


async def test_uncaught_soft_limit_fails_then_hard_limit_still_holds(rt: Runtime) -> None:
    @rt.task(soft_timeout=0.1)
    async def ignores() -> None:
        await anyio.sleep(10)

    @rt.task(soft_timeout=0.1, timeout=0.5)
    async def swallows() -> None:
        try:
            await anyio.sleep(10)
        except SoftTimeLimitExceeded:
            await anyio.sleep(10)  # the hard limit stops this

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            with pytest.raises(Exception, match="soft time limit") as soft:
                await rt.run(ignores.s())
            with pytest.raises(TaskTimeLimitExceeded):
                await rt.run(swallows.s())
    assert soft.value.info.type.endswith("SoftTimeLimitExceeded")  # type: ignore[attr-defined]


async def test_soft_limit_in_a_thread_task_at_its_next_check(rt: Runtime) -> None:
    @rt.task(soft_timeout=0.1)
    def steps() -> int:
        ctx = current_task()
        n = 0
        try:
            while n < 10_000:
                ctx.raise_if_cancelled()
                time.sleep(0.005)
                n += 1
        except SoftTimeLimitExceeded:
            return -n
        return n

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await rt.run(steps.s()) < 0


def test_soft_limit_must_be_below_the_hard_one() -> None:
    with pytest.raises(ConfigError, match="soft_timeout"):
        Runtime().task(soft_timeout=5, timeout=5)(lambda: None)
