"""Waiting for results: woken by a notification, never hanging."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.errors import ResultTimeout
from runtime.messages import Result, State
from tests.results_contract.helpers import failed, ok, started

pytestmark = pytest.mark.result_promise(4)


async def test_wait_returns_a_result_stored_earlier(store: Any) -> None:
    await store.put(ok("t1", "ready"))

    with anyio.fail_after(5):
        result = await store.wait("t1", timeout=5)

    assert result.value == "ready"


async def test_wait_wakes_on_a_result_put_meanwhile(store: Any) -> None:
    got: list[Result] = []

    async def waiter() -> None:
        got.append(await store.wait("t1", timeout=10))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await store.put(started("t1"))  # not terminal: the waiter keeps waiting
            await store.put(ok("t1", {"sum": 3}))

    assert [(r.state, r.value) for r in got] == [(State.SUCCESS, {"sum": 3})]


async def test_wait_wakes_on_a_failure_too(store: Any) -> None:
    got: list[Result] = []

    async def waiter() -> None:
        got.append(await store.wait("t1", timeout=10))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await store.put(failed("t1", "bad input"))

    assert got[0].state is State.FAILURE
    assert got[0].error is not None and got[0].error.message == "bad input"


async def test_wait_times_out_with_result_timeout(store: Any) -> None:
    await store.put(started("t1"))

    with anyio.fail_after(5), pytest.raises(ResultTimeout) as caught:
        await store.wait("t1", timeout=0.2)

    assert caught.value.task_id == "t1"
    assert "STARTED" in str(caught.value)


async def test_wait_for_an_unknown_id_times_out(store: Any) -> None:
    with anyio.fail_after(5), pytest.raises(ResultTimeout, match="PENDING"):
        await store.wait("nobody-runs-this", timeout=0.1)


async def test_a_timed_out_wait_can_be_waited_again(store: Any) -> None:
    with anyio.fail_after(5):
        with pytest.raises(ResultTimeout):
            await store.wait("t1", timeout=0.05)
        await store.put(ok("t1", 1))
        assert (await store.wait("t1", timeout=5)).value == 1


async def test_200_concurrent_waiters_are_all_woken(store: Any) -> None:
    # 100 ids, two waiters on each.
    got: dict[tuple[int, int], Any] = {}

    async def waiter(i: int, copy: int) -> None:
        result = await store.wait(f"t{i}", timeout=20)
        got[(i, copy)] = result.value

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for i in range(100):
                for copy in range(2):
                    tg.start_soon(waiter, i, copy)
            await anyio.wait_all_tasks_blocked()
            await store.put_many([ok(f"t{i}", i) for i in range(100)])

    assert len(got) == 200
    assert all(value == i for (i, _), value in got.items())


async def test_cancelled_waiters_leave_others_waiting(store: Any) -> None:
    got: list[Any] = []

    async def waiter() -> None:
        got.append((await store.wait("t1", timeout=10)).value)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as doomed:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(waiter)
                    tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    doomed.cancel()
            await store.put(ok("t1", "for the survivor"))

    assert got == ["for the survivor"]
