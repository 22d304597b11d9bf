"""Canvas on the memory broker: chain, group, chord, nesting, replacement, failures."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime import (
    Runtime,
    TaskDeadLettered,
    TaskError,
    chain,
    chord,
    chunks,
    group,
    map,
    run,
    starmap,
)
from tests.runtime.helpers import LIMIT, Counter, dead_letters


class Tasks:
    """A set of tasks on one runtime, with call counters."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.body_calls = Counter()
        self.errback_calls = Counter()
        self.release = anyio.Event()

        @rt.task(name="add")
        async def add(x: int, y: int) -> int:
            return x + y

        @rt.task(name="tsum")
        async def tsum(xs: list[int]) -> int:
            self.body_calls(xs)
            return sum(xs)

        @rt.task(name="boom")
        async def boom(*args: Any) -> int:
            raise ValueError("boom")

        @rt.task(name="blocked")
        async def blocked(x: int) -> int:
            await self.release.wait()
            return x

        @rt.task(name="on_error")
        async def on_error(task_id: str, error: dict[str, str]) -> None:
            self.errback_calls(task_id, error)

        @rt.task(name="ident")
        async def ident(x: Any) -> Any:
            return x

        @rt.task(name="chunk_sum")
        def chunk_sum(xs: list[int]) -> list[int]:
            return [x * 10 for x in xs]

        @rt.task(name="fan_out")
        async def fan_out(n: int) -> Any:
            return group(add.s(i, i) for i in range(n)) | tsum.s()

        @rt.task(name="replace_with")
        async def replace_with(x: int) -> Any:
            return add.s(x, 100)

        self.add, self.tsum, self.boom, self.blocked = add, tsum, boom, blocked
        self.on_error, self.ident, self.chunk_sum = on_error, ident, chunk_sum
        self.fan_out, self.replace_with = fan_out, replace_with


@pytest.fixture
def t(rt: Runtime) -> Tasks:
    return Tasks(rt)


async def test_chain(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(chain(t.add.s(1, 1), t.add.s(10), t.add.s(100))) == 112
            assert await run(t.add.s(1, 1) | t.add.si(5, 5)) == 10  # .si ignores the previous result
            handle = await rt.enqueue(t.add.s(1, 2) | t.add.s(3))
            assert await handle.result(timeout=LIMIT) == 6
            assert await rt.handle(handle.id).result(timeout=1) == 6


async def test_group(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(group(t.add.s(i, i) for i in range(5))) == [0, 2, 4, 6, 8]
            assert await run(group(t.add.s(1, 1))) == [2]


async def test_chord(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert await run(chord((t.add.s(i, i) for i in range(5)), t.tsum.s())) == 20
            await worker.idle()
    assert t.body_calls.calls == [([0, 2, 4, 6, 8],)]


async def test_pipeline_with_a_group_becomes_a_chord(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(t.add.s(1, 1) | group(t.add.s(1), t.add.s(2)) | t.tsum.s()) == 7
            assert await run(group(t.add.s(1, 1), t.add.s(2, 2)) | t.tsum.s() | t.add.s(1)) == 7


async def test_nested_canvases(rt: Runtime, t: Tasks) -> None:
    add, tsum = t.add, t.tsum
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            # a chain ending in a group
            assert await run(add.s(1, 1) | group(add.s(1), add.s(2))) == [3, 4]
            # a chord inside a chain
            assert await run(add.s(1, 1) | chord([add.s(1), add.s(2)], tsum.s()) | add.s(10)) == 17
            # a group of chains
            assert await run(group(add.s(1, 1) | add.s(1), add.s(2, 2) | add.s(2))) == [3, 6]
            # a chord whose header holds a chord
            inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
            assert await run(chord([inner, add.s(3, 3)], tsum.s())) == 12
            # a group of groups
            assert await run(group(group(add.s(1, 1), add.s(2, 2)), add.s(3, 3))) == [[2, 4], 6]
            # a chain inside a chord header, and the chord's result chained on
            assert await run(chord([add.s(1, 1) | add.s(1), add.s(0, 0)], tsum.s()) | add.s(1)) == 4


async def test_dynamic_replacement(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(t.replace_with.s(1)) == 101
            assert await run(t.fan_out.s(4)) == 12
            # a replaced step inside a chain hands its (replacement's) result on
            assert await run(t.add.s(1, 1) | t.replace_with.s() | t.add.s(1)) == 103
            handle = await rt.enqueue(t.fan_out.s(3))
            assert await handle.result(timeout=LIMIT) == 6  # under the original task's id


async def test_a_chain_stops_at_the_first_failure(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chain(t.add.s(1, 1), t.boom.s(), t.tsum.s()).on_error(t.on_error.s())
            handle = await rt.enqueue(canvas)
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert info.value.info.type == "ValueError"
    assert info.value.info.reason.startswith("upstream:")
    assert t.body_calls.n == 0  # the step after the failure never ran
    assert t.errback_calls.n == 1
    failed_id, error = t.errback_calls.calls[0]
    assert error["type"] == "ValueError"
    assert error["message"] == "boom"
    assert [reason for _, reason in await dead_letters(rt)] == ["failed"]
    assert (failed_id, "failed") in await dead_letters(rt)


async def test_a_chord_member_failure_fails_the_chord_at_once(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chord([t.blocked.s(1), t.boom.s(), t.blocked.s(2)], t.tsum.s()).on_error(
                t.on_error.s())
            handle = await rt.enqueue(canvas)
            # raised while the other members are still running
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            t.release.set()
            await worker.idle()
    assert info.value.info.type == "ValueError"
    assert t.body_calls.n == 0
    assert t.errback_calls.n == 1


async def test_errbacks_run_once_however_many_members_fail(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chord([t.boom.s(), t.boom.s(), t.add.s(1, 1)], t.tsum.s()).on_error(t.on_error.s())
            with pytest.raises(TaskError):
                await run(canvas)
            await worker.idle()
    assert t.errback_calls.n == 1
    assert t.body_calls.n == 0


async def test_a_group_member_failure_fails_the_group(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            with pytest.raises(TaskError, match="boom"):
                await run(group(t.add.s(1, 1), t.boom.s()))


async def test_a_signature_errback(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(t.boom.s().on_error(t.on_error.s()))
            with pytest.raises(TaskError):
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert t.errback_calls.calls[0][0] == handle.id


async def test_a_chord_body_runs_once_when_members_are_delivered_twice(rt: Runtime, t: Tasks) -> None:
    from runtime import canvas as cv

    node = cv.to_node(chord([t.add.s(1, 1), t.add.s(2, 2)], t.tsum.s()), final="F")
    messages = cv.start(node, rt.registry)
    with anyio.fail_after(LIMIT):
        async with rt:
            await rt.publish([*messages, *messages, *messages])  # every member three times
            async with rt.worker(concurrency=1) as worker:
                assert await rt.handle("F").result(timeout=LIMIT) == 6
                await worker.idle()
    assert t.body_calls.calls == [([2, 4],)]


async def test_map_starmap_chunks(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(map(t.ident, [1, "a", None])) == [1, "a", None]
            assert await run(starmap(t.add, [(1, 2), (3, 4)])) == [3, 7]
            assert await run(chunks(t.chunk_sum, range(7), 3)) == [[0, 10, 20], [30, 40], [50, 60]]


async def test_an_errback_that_does_not_fit_fails_on_its_own(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            # the errback's signature does not fit (task_id, error): it fails on its own
            with pytest.raises(TaskError):
                await run(t.boom.s().on_error(t.add.s()))
            await worker.idle()
            assert sorted(reason for _, reason in await dead_letters(rt)) == ["bad_arguments", "failed"]
            assert await run(t.add.s(1, 2)) == 3


async def test_dead_lettered_steps_raise_dead_lettered(rt: Runtime, t: Tasks) -> None:
    from runtime import Reject

    @rt.task(name="reject")
    async def reject(x: int) -> int:
        raise Reject("no")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            handle = await rt.enqueue(t.add.s(1, 1) | reject.s())
            with pytest.raises(TaskDeadLettered):
                await handle.result(timeout=LIMIT)



async def test_a_replacement_group_inside_a_chain_joins_then_goes_on(rt: Runtime, t: Tasks) -> None:
    @rt.task(name="split")
    async def split(n: int) -> Any:
        return group(t.add.s(i, i) for i in range(n))

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(split.s(3) | t.tsum.s() | t.add.s(1))
            assert await handle.result(timeout=LIMIT) == 7
            await worker.idle()
    assert t.body_calls.calls == [([0, 2, 4],)]


async def test_a_chord_body_can_retry(rt: Runtime, t: Tasks) -> None:
    tries: list[int] = []

    @rt.task(name="flaky_body", retries=2, backoff=0.01, jitter=0)
    async def flaky_body(xs: list[int]) -> int:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("first try fails")
        return sum(xs)

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(shutdown_grace_s=0.1):
            assert await run(chord([t.add.s(1, 1), t.add.s(2, 2)], flaky_body.s()), timeout=3) == 6


async def test_a_deep_failure_reaches_the_outermost_waiter(rt: Runtime, t: Tasks) -> None:
    inner = chord([t.boom.s(), t.add.s(1, 1)], t.tsum.s())
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(group(inner, t.add.s(2, 2)) | t.tsum.s() | t.add.s(1))
            with pytest.raises(TaskError, match="boom"):
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert t.body_calls.n == 0


async def test_a_later_steps_countdown_is_honoured(rt: Runtime, t: Tasks) -> None:
    import time

    stamps: list[float] = []

    @rt.task(name="stamp")
    async def stamp(x: int) -> int:
        stamps.append(time.monotonic())
        return x

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            assert await run(stamp.s(1) | stamp.s().set(countdown=0.1)) == 1
    assert stamps[1] - stamps[0] >= 0.1
