"""Inside a task (issue 13): current_task(), meta, STARTED, per-task ttl,
retry_intervals, hooks and progress; on memory and on Redis."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from runtime import (
    Retry,
    Runtime,
    State,
    TaskError,
    current_task,
    group,
)
from runtime.errors import NotInTaskError
from runtime.messages import Result
from runtime.retry import RetryPolicy, next_delay

LIMIT = 20.0  # bound on every wait; the work here takes milliseconds


async def wait_until(check: Any, *args: Any) -> Any:
    """Call ``await check(*args)`` until truthy (bounded by the test's fail_after)."""
    while not (found := await check(*args)):
        await anyio.sleep(0.02)
    return found


async def test_current_task_outside_a_task_raises() -> None:
    with pytest.raises(NotInTaskError, match="outside a task body"):
        current_task()


async def test_context_async_and_thread(rt: Runtime) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def grab(label: str) -> None:
        ctx = current_task()
        seen[label] = dict(id=ctx.id, name=ctx.name, attempt=ctx.attempt, queue=ctx.queue,
                           priority=ctx.priority, parent=ctx.parent_id, root=ctx.root_id,
                           group=ctx.group_id, count=ctx.delivery_count, worker=ctx.worker)
        ctx.meta["by"] = label

    @rt.task(queue="ctxq")
    async def in_loop() -> str:
        grab("async")
        return "a"

    @rt.task(queue="ctxq")
    def in_thread() -> str:
        grab("thread")
        return "t"

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            a = await rt.enqueue(in_loop.s(), priority=3)
            t = await rt.enqueue(in_thread.s())
            assert (await a, await t) == ("a", "t")
            info_a, info_t = await a.info(), await t.info()
    assert seen["async"]["id"] == a.id and seen["thread"]["id"] == t.id
    assert seen["async"]["name"] == in_loop.name
    assert (seen["async"]["attempt"], seen["async"]["queue"], seen["async"]["priority"]) == \
        (1, "ctxq", 3)
    assert seen["async"]["worker"] == worker.name
    assert (seen["async"]["root"], seen["async"]["parent"], seen["async"]["group"]) == \
        (a.id, None, None)
    assert seen["async"]["count"] >= 0
    assert info_a is not None and info_a.meta == {"by": "async"}
    assert info_t is not None and info_t.meta == {"by": "thread"}


async def test_group_member_knows_its_group(rt: Runtime) -> None:
    groups: list[str | None] = []

    @rt.task
    async def member() -> None:
        groups.append(current_task().group_id)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            handle = await rt.enqueue(group(member.s(), member.s()))
            await handle
    assert groups == [handle.id, handle.id]


async def test_started_state_while_running(rt: Runtime) -> None:
    go = anyio.Event()

    @rt.task(retries=1, backoff=0.0)
    async def slow() -> int:
        if current_task().attempt == 1:
            raise Retry(0.0)
        await go.wait()
        return 1

    async def started(handle: Any) -> Result | None:
        info: Result | None = await handle.info()
        return info if info is not None and info.state is State.STARTED else None

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            before = time.time() * 1000
            handle = await rt.enqueue(slow.s())
            info = await wait_until(started, handle)
            assert info.worker == worker.name and info.attempt == 2
            assert info.started_ms is not None and info.started_ms >= before - 1000
            assert await handle.status() is State.STARTED
            go.set()
            assert await handle == 1
            done = await handle.info()
    assert done is not None and (done.state, done.attempt) == (State.SUCCESS, 2)


async def test_per_task_ttl(rt: Runtime) -> None:
    @rt.task(result_ttl=0.3)
    async def brief() -> int:
        return 1

    @rt.task(failure_ttl=0.3)
    async def fails_briefly() -> None:
        raise ValueError("x")

    @rt.task
    async def kept() -> int:
        return 2

    async def gone(handle: Any) -> bool:
        return await handle.info() is None

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            b, f, k = (await rt.enqueue(brief.s()), await rt.enqueue(fails_briefly.s()),
                       await rt.enqueue(kept.s()))
            assert await b == 1 and await k == 2
            with pytest.raises(TaskError):
                await f
            await wait_until(gone, b)
            await wait_until(gone, f)
            assert await k.status() is State.SUCCESS


def test_retry_intervals_schedule() -> None:
    policy = RetryPolicy(retries=5, intervals=(1, 5, 30))
    assert [next_delay(n, policy) for n in range(1, 6)] == [1, 5, 30, 30, 30]


async def test_retry_intervals_run(rt: Runtime) -> None:
    tries: list[float] = []

    @rt.task(retry_intervals=[0.05, 0.2])
    async def flaky() -> int:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ConnectionError("again")
        return len(tries)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await rt.run(flaky.s()) == 3  # retries default to len(retry_intervals)
    assert tries[1] - tries[0] >= 0.05 and tries[2] - tries[1] >= 0.2


async def test_hooks_once_after_store_and_never_change_outcome(rt: Runtime) -> None:
    calls: list[tuple[str, str, Any]] = []

    async def on_success(ctx: Any, value: Any) -> None:
        stored = await rt.results.get(ctx.id)
        calls.append(("success", ctx.id, (value, stored.state if stored else None)))
        raise RuntimeError("a broken hook")

    def on_failure(ctx: Any, error: BaseException) -> None:
        calls.append(("failure", ctx.id, type(error).__name__))

    def on_retry(ctx: Any, error: BaseException, delay: float) -> None:
        calls.append(("retry", ctx.id, delay))

    @rt.task(on_success=on_success)
    async def good() -> int:
        return 7

    @rt.task(retries=1, retry_intervals=[0.01], on_failure=on_failure, on_retry=on_retry)
    async def bad() -> None:
        raise KeyError("k")

    @rt.on_success
    async def everywhere(ctx: Any, value: Any) -> None:
        calls.append(("global", ctx.id, value))

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            g = await rt.enqueue(good.s())
            b = await rt.enqueue(bad.s())
            assert await g == 7
            with pytest.raises(TaskError):
                await b
            await worker.idle()
    assert sorted(c for c in calls if c[1] == g.id) == [
        ("global", g.id, 7), ("success", g.id, (7, State.SUCCESS))]
    assert [c for c in calls if c[1] == b.id] == [("retry", b.id, 0.01),
                                                  ("failure", b.id, "KeyError")]


async def test_progress_coalesced_and_streamed(rt: Runtime) -> None:
    go = anyio.Event()
    n = 100_000
    writes: list[int] = []
    put_many = rt.results.put_many

    async def counting(results: Any) -> list[bool]:
        writes.append(len(results))
        return await put_many(results)

    rt.results.put_many = counting  # type: ignore[method-assign]

    @rt.task
    async def crunch() -> str:
        ctx = current_task()
        await ctx.progress(0, total=n, message="waiting")
        await go.wait()
        for i in range(1, n + 1):
            await ctx.progress(i, total=n, message="crunching", phase="one")
        ctx.meta["model"] = "minilm"
        return "done"

    updates: list[Result] = []
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            handle = await rt.enqueue(crunch.s())

            async def waiting(h: Any) -> bool:
                info = await h.info()
                return info is not None and info.progress is not None

            async with anyio.create_task_group() as tg:
                async def follow() -> None:
                    async for u in handle.updates():
                        updates.append(u)
                        if u.progress is not None and u.progress.message == "waiting":
                            go.set()
                tg.start_soon(follow)
                await wait_until(waiting, handle)
            info = await handle.info()
    assert len(writes) < 1000, f"{len(writes)} writes for {n} progress calls"
    assert updates[-1].state is State.SUCCESS
    assert updates[-1].meta == {"model": "minilm"}
    last = updates[-1].progress
    assert last is not None and (last.done, last.total, last.meta) == (n, n, {"phase": "one"})
    assert any(u.state is State.STARTED for u in updates)
    assert info is not None and info.progress is not None and info.progress.done == n
