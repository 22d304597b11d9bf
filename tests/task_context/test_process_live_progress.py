"""Live progress from kind="process" tasks (issue 13 item 3): what a task in a
pool process reports reaches the result store while it runs, coalesced."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from runtime import Runtime, State
from runtime.messages import Progress
from runtime.process.pool import ProcessPool
from runtime.process.pool_live import Progressed, ProgressOut
from tests.task_context import proc_live_app
from tests.task_context.proc_live_rig import (
    APP,
    KINDS,
    LIMIT,
    heard,
    make_fifo,
    release,
    runtime_on,
)


@pytest.fixture(params=KINDS)
async def rt(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Runtime]:
    async for runtime in runtime_on(request.param, namespace):
        yield runtime


async def test_progress_reaches_updates_while_the_process_task_runs(rt: Runtime,
                                                                    tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path)
    async with ProcessPool(APP, size=1) as pool:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool):
                handle = await rt.enqueue(proc_live_app.reports_then_waits.s(str(fifo)))
                async for update in handle.updates():  # the body waits on the fifo meanwhile
                    if update.progress is not None:
                        break
                info = await handle.info()
                await release(fifo, "went on")
                assert await handle.result(timeout=LIMIT) == "went on"
                final = await handle.info()
    assert update.state is State.STARTED
    assert update.progress is not None
    assert (update.progress.done, update.progress.total, update.progress.message,
            update.progress.meta) == (1, 2, "half", {"phase": "one"})
    assert info is not None and info.state is State.STARTED
    assert info.progress is not None and info.progress.done == 1
    assert info.meta == {"stage": "waiting"}  # current_task().meta, live too
    assert final is not None and final.progress is not None and final.progress.done == 2
    assert final.meta == {"stage": "waiting"}


async def test_a_tight_progress_loop_sends_a_few_reports_not_one_per_call(
        rt: Runtime, tmp_path: Path) -> None:
    n = 100_000
    looped, go = make_fifo(tmp_path, "looped"), make_fifo(tmp_path, "go")
    async with ProcessPool(APP, size=1) as pool:
        with anyio.fail_after(LIMIT):
            async with rt, rt.worker(processes=pool):
                handle = await rt.enqueue(
                    proc_live_app.tight_loop_then_waits.s(n, str(looped), str(go)))
                assert await heard(looped) == "looped"
                async for update in handle.updates():  # the loop's last report, live
                    if update.progress is not None and update.progress.done == n:
                        break
                await release(go)
                assert await handle.result(timeout=LIMIT) == "go"
    # coalesced in the pool process: the writer sends the latest report when it
    # gets to run, so a tight loop costs a handful of frames, not n
    assert 1 <= pool.progress_frames < n // 100
    assert update.state is State.STARTED


def test_the_last_report_of_a_burst_is_always_sent() -> None:
    """The writer thread never loses the latest report to a race with the
    task's thread (which keeps noting new ones while a frame is written)."""
    n = 20_000
    decoder = msgspec.msgpack.Decoder(Progressed)
    sent: list[float] = []
    last = threading.Event()

    def write(body: bytes) -> None:
        done = decoder.decode(body).progress.done
        sent.append(done)
        if done == n:
            last.set()

    out = ProgressOut(write)
    for _ in range(20):
        sent.clear()
        last.clear()
        out.begin({})
        for i in range(n):
            out.note(Progress(done=i + 1))
        assert last.wait(LIMIT), f"the last report was never sent (sent {sent[-3:]})"
        out.end()
        assert sent == sorted(sent) and len(sent) < n // 10
