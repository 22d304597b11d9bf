"""A caller whose task finished but whose result has expired learns it at once,
as ``ResultExpired`` naming the id and what to do, instead of waiting for
``ResultTimeout`` and its "is a worker consuming its queue?" hint (issue 12,
item 2). The expiry marker the result store keeps beside each finished task
makes the difference (runtime/results/base.py, promise 9)."""

from __future__ import annotations

import anyio
import pytest

from runtime import ResultExpired, ResultTimeout, Runtime, run
from tests.canvas.conftest import BROKERS, make_runtime, purge
from tests.results_contract.helpers import eventually
from tests.runtime.helpers import LIMIT

#: far longer than LIMIT: a caller that waits for its timeout fails the test's bound
LONG_WAIT = 600.0


async def _expired(rt: Runtime, task_id: str) -> None:
    async def gone() -> bool:
        return await rt.results.get(task_id) is None

    await eventually(gone, what=f"the result of {task_id} expiring")


@pytest.mark.parametrize("kind", BROKERS)
async def test_awaiting_an_expired_result_raises_result_expired_at_once(
        kind: str, namespace: str) -> None:
    rt = make_runtime(kind, namespace)

    @rt.task(name="front_door.brief", result_ttl=0.5)
    async def brief() -> int:
        return 7

    try:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker():
                handle = await rt.enqueue(brief.s())
                assert await handle.result() == 7
                await _expired(rt, handle.id)
        for ask in (lambda: handle.result(timeout=LONG_WAIT), handle.status):
            try:
                with anyio.fail_after(LIMIT):
                    async with rt:
                        await ask()
            except ResultExpired as e:
                caught = e
            else:
                raise AssertionError("an expired result did not raise ResultExpired")
            assert caught.task_id == handle.id
            assert handle.id in str(caught) and "result_ttl" in str(caught)
            assert "worker" not in str(caught)
    finally:
        await purge(rt)


async def test_an_unknown_id_still_times_out() -> None:
    rt = Runtime()
    try:
        async with rt:
            await rt.handle("never-sent").result(timeout=0.05)
    except ResultTimeout as e:
        assert not isinstance(e, ResultExpired)
    else:
        raise AssertionError("waiting on an unknown id returned")


async def test_run_of_a_fresh_task_is_not_mistaken_for_an_expired_one() -> None:
    rt = Runtime()

    @rt.task(name="front_door.fresh", result_ttl=0.5)
    async def fresh(x: int) -> int:
        return x

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert [await run(fresh.s(i)) for i in range(3)] == [0, 1, 2]
