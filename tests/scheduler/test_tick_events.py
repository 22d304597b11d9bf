"""Each published tick is an event on the runtime's event stream (issue 15:
"Visible"), on memory and on the shared Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

import anyio
import pytest

from runtime import Runtime, every
from runtime.ops.events import TickEvent
from runtime.ops.scheduler import run_scheduler, task_id_for
from tests.conftest import REDIS_URL


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_published_tick_is_an_event(kind: str, namespace: str) -> None:
    rt = (Runtime() if kind == "memory"
          else Runtime(broker=REDIS_URL, namespace=namespace))

    @rt.task(name="ticked", schedule=every(timedelta(seconds=1)))
    async def ticked() -> None: ...

    seen: list[TickEvent] = []
    async with rt, rt.worker(), anyio.create_task_group() as tg:
        async def follow(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            stream = rt.ops.events(since="0")  # from the oldest kept: no race with the start
            task_status.started()
            async for record in stream:
                if isinstance(record.event, TickEvent):
                    seen.append(record.event)
                    tg.cancel_scope.cancel()

        await tg.start(follow)
        await tg.start(partial(run_scheduler, rt))
        with anyio.fail_after(60):  # generous: a tick a second on a busy machine
            await anyio.sleep_forever()
    assert seen, "no tick event"
    tick = seen[0]
    assert tick.schedule == "ticked" and not tick.skipped
    assert tick.task_id.startswith("sched:ticked:")
    assert tick.task_id == task_id_for("ticked", datetime.fromtimestamp(tick.tick_ms / 1000, UTC))
