"""``updates()`` through a burst of writes: each wake-up re-subscribes, and a
notification of the previous subscription arriving after the new SUBSCRIBE was
sent must not leave the new waiter unconfirmed (it hung there: the message took
the waiter, then the SUBSCRIBE confirmation found none and never set ``ready``)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.messages import Progress, Result, State
from tests.results_contract.helpers import ok, started

pytestmark = pytest.mark.result_promise(4)


@pytest.mark.parametrize("rounds", [30])
async def test_updates_end_with_the_terminal_record_through_bursts(store: Any,
                                                                   rounds: int) -> None:
    for r in range(rounds):
        task_id = f"burst-{r}"
        await store.put(started(task_id))
        seen: list[Result] = []

        async def follow(tid: str = task_id, into: list[Result] = seen) -> None:
            async for update in store.updates(tid):
                into.append(update)

        with anyio.fail_after(10):  # generous: a hang is the failure, not slowness
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await anyio.wait_all_tasks_blocked()
                for i in range(10):  # a burst of progress records, then the end
                    await store.put(Result(id=task_id, state=State.STARTED,
                                           progress=Progress(done=i, total=10)))
                await store.put(ok(task_id, r))
        assert seen[-1].state is State.SUCCESS and seen[-1].value == r
