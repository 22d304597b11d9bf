"""The canvas on every broker: chain, group, chord, nesting, replacement, options, failures.

Each test runs on memory, Redis and RabbitMQ (``rt`` in conftest.py) with a
worker embedded in the test's event loop. Executions are counted by the tasks
(``Tasks.runs``), never inferred from timings; every test is bounded by
``anyio.fail_after``.
"""

from __future__ import annotations

import time

import anyio
import pytest

from runtime import (
    Runtime,
    TaskError,
    chain,
    chord,
    chunks,
    group,
    run,
    starmap,
)
from runtime import canvas as cv
from runtime import map as tmap
from runtime import worker as worker_module
from tests.canvas.tasks import LIMIT, Tasks


@pytest.fixture
def t(rt: Runtime) -> Tasks:
    return Tasks(rt)


# -- the three primitives ---------------------------------------------------------------


async def test_a_chain_feeds_each_result_to_the_next_step(rt: Runtime, t: Tasks) -> None:
    add = t.add
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert await run(chain(add.s(1, 1), add.s(10), add.s(100))) == 112
            handle = await rt.enqueue(add.s(1, 2) | add.s(3) | add.s(4))
            assert await handle.result(timeout=LIMIT) == 10
            assert await rt.handle(handle.id).result(timeout=LIMIT) == 10
            await worker.idle()
    assert t.runs["add"] == 6  # every step ran once


async def test_a_group_gives_its_results_in_member_order(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            # the members finish in reverse order; the list is still in member order
            assert await run(group(t.reverse.s("g", i, 6) for i in range(6))) == [
                0, 10, 20, 30, 40, 50]
            assert await run(group(t.add.s(1, 1))) == [2]
            await worker.idle()
    assert t.runs["reverse"] == 6
    assert t.runs["add"] == 1


async def test_a_chord_runs_its_body_once_with_results_in_header_order(
        rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            header = [t.reverse.s("c", i, 5) for i in range(5)]
            assert await run(chord(header, t.tsum.s())) == 100
            await worker.idle()
    assert t.bodies == [[0, 10, 20, 30, 40]]
    assert t.runs["reverse"] == 5


async def test_pipelines_with_a_group_make_a_chord(rt: Runtime, t: Tasks) -> None:
    add, tsum = t.add, t.tsum
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert await run(add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s()) == 7
            assert await run(group(add.s(1, 1), add.s(2, 2)) | tsum.s() | add.s(1)) == 7
            assert await run(group(add.s(1, 1), add.s(2, 2)) | tsum.s()) == 6
            await worker.idle()
    assert t.bodies == [[3, 4], [2, 4], [2, 4]]  # each body once


async def test_si_ignores_the_previous_result(rt: Runtime, t: Tasks) -> None:
    add, tsum = t.add, t.tsum
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert await run(add.s(1, 1) | add.si(5, 5)) == 10
            assert await run(add.s(1, 1) | add.si(5, 5) | add.s(1)) == 11
            # an immutable chord body gets its own arguments, not the header's results
            assert await run(chord([add.s(1, 1), add.s(2, 2)], tsum.si([7, 8]))) == 15
            # an immutable step after a group: the group is still waited for
            assert await run(group(t.record.s("a"), t.record.s("b")) | t.record.si("after")) == "after"
            await worker.idle()
    assert t.bodies == [[7, 8]]
    assert sorted(t.order[:2]) == ["a", "b"]
    assert t.order[2] == "after"


# -- call options ------------------------------------------------------------------------


async def test_set_queue_routes_the_step_to_that_queue(rt: Runtime, t: Tasks) -> None:
    add = t.add
    with anyio.fail_after(LIMIT):
        async with rt:
            async with rt.worker(queues=["default"]) as worker:
                handle = await rt.enqueue(add.s(1, 2).set(queue="side"))
                # a later chain step routed elsewhere: published when the first step ends
                chained = await rt.enqueue(add.s(1, 1) | add.s(5).set(queue="side"))
                await worker.idle()
                assert t.runs["add"] == 1  # only the first chain step ran on "default"
            side = await rt.broker.stats("side")
            assert side.ready == 2
            async with rt.worker(queues=["side"]) as worker:
                assert await handle.result(timeout=LIMIT) == 3
                assert await chained.result(timeout=LIMIT) == 7
                await worker.idle()
    assert t.runs["add"] == 3


async def test_set_priority_serves_higher_priorities_first(rt: Runtime, t: Tasks) -> None:
    record = t.record
    with anyio.fail_after(LIMIT):
        async with rt:
            handles = [await rt.enqueue(record.s(f"low{i}")) for i in range(3)]
            handles.append(await rt.enqueue(record.s("high").set(priority=9)))
            handles.append(await rt.enqueue(record.s("mid").set(priority=5)))
            async with rt.worker(concurrency=1, prefetch=1) as worker:
                for handle in handles:
                    await handle.result(timeout=LIMIT)
                await worker.idle()
    assert t.order[:2] == ["high", "mid"]
    assert sorted(t.order[2:]) == ["low0", "low1", "low2"]


async def test_set_countdown_is_never_early(rt: Runtime, t: Tasks) -> None:
    stamp = t.stamp
    countdown = 0.3
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            before = time.monotonic()
            assert await run(stamp.s("first").set(countdown=countdown)) == "first"
            # a later step: its countdown starts when the step before it ends
            assert await run(stamp.s("a") | stamp.si("b").set(countdown=countdown)) == "b"
            await worker.idle()
    assert t.stamps["first"] - before >= countdown
    assert t.stamps["b"] - t.stamps["a"] >= countdown
    assert t.runs["stamp"] == 3


# -- errbacks ----------------------------------------------------------------------------


async def test_a_signature_errback_runs_once_with_task_id_and_error(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(t.boom.s().on_error(t.on_error.s()))
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert info.value.info.type == "ValueError"
    assert len(t.errbacks) == 1
    task_id, error = t.errbacks[0]
    assert task_id == handle.id
    assert error["type"] == "ValueError"
    assert error["message"] == "boom"
    assert error["reason"] == "failed"


async def test_a_group_errback_runs_once_however_many_members_fail(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = group(t.boom.s(), t.add.s(1, 1), t.boom.s()).on_error(t.on_error.s())
            handle = await rt.enqueue(canvas)
            with pytest.raises(TaskError, match="boom"):
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert t.runs["boom"] == 2
    assert t.runs["on_error"] == 1
    assert t.errbacks[0][1]["type"] == "ValueError"


# -- nesting -----------------------------------------------------------------------------


async def test_nested_canvases(rt: Runtime, t: Tasks) -> None:
    add, tsum = t.add, t.tsum
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            # a chain containing a group (in the middle, then at the end)
            assert await run(add.s(1, 1) | group(add.s(1), add.s(2)) | tsum.s() | add.s(1)) == 8
            assert await run(add.s(1, 1) | group(add.s(1), add.s(2))) == [3, 4]
            # a chord inside a chain
            assert await run(add.s(1, 1) | chord([add.s(1), add.s(2)], tsum.s()) | add.s(10)) == 17
            # a group of chains
            assert await run(group(add.s(1, 1) | add.s(1), add.s(2, 2) | add.s(2) | add.s(2))) == [
                3, 8]
            # a chord whose header contains a chord
            inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
            assert await run(chord([inner, add.s(3, 3)], tsum.s())) == 12
            # three levels: a chord in a chord in a chord header, then a chain
            deepest = chord([add.s(0, 1), add.s(0, 2)], tsum.s())
            middle = chord([deepest, add.s(0, 4)], tsum.s())
            assert await run(chord([middle, add.s(0, 8)], tsum.s()) | add.s(100)) == 115
            # a group of groups, a group of chords
            assert await run(group(group(add.s(1, 1), add.s(2, 2)), add.s(3, 3))) == [[2, 4], 6]
            assert await run(group(chord([add.s(1, 1)], tsum.s()),
                                   chord([add.s(2, 2), add.s(3, 3)], tsum.s()))) == [2, 10]
            await worker.idle()
    # every chord body ran once: 1 (chord in chain) + 2 (header chord) + 3 (three levels)
    # + 2 (group of chords) + 1 (chain group -> chord)
    assert t.runs["tsum"] == 9
    assert sorted(t.bodies) == sorted([[3, 4], [3, 4], [2, 4], [6, 6], [1, 2], [3, 4], [7, 8],
                                       [2], [4, 6]])


# -- dynamic fan-out ---------------------------------------------------------------------


async def test_a_task_may_return_a_canvas_that_replaces_it(rt: Runtime, t: Tasks) -> None:
    add = t.add
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(t.replace_sig.s(1))
            assert await handle.result(timeout=LIMIT) == 101  # under the original task's id
            assert await run(t.replace_group.s(4)) == [0, 2, 4, 6]
            assert await run(t.replace_chain.s(1)) == 7
            assert await run(t.replace_chord.s(4)) == 12
            assert await run(t.replace_twice.s(1)) == 107  # a replacement that is replaced
            # replaced steps inside a chain hand their final result on
            assert await run(add.s(1, 1) | t.replace_sig.s() | add.s(1)) == 103
            assert await run(add.s(1, 1) | t.replace_group.s() | t.tsum.s()) == 2
            # replaced members of a chord header
            assert await run(chord([t.replace_chord.s(3), t.replace_sig.s(0), add.s(1, 1)],
                                   t.tsum.s())) == 108
            assert await run(group(t.replace_group.s(2), t.replace_chain.s(0))) == [[0, 2], 6]
            await worker.idle()
    assert t.runs["replace_sig"] == 4
    assert t.runs["replace_chord"] == 2
    assert sorted(t.bodies) == sorted([[0, 2, 4, 6], [0, 2], [0, 2, 4], [6, 100, 2]])


async def test_map_starmap_chunks(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            assert await run(tmap(t.ident, [1, "a", None, [2]])) == [1, "a", None, [2]]
            assert await run(starmap(t.add, [(1, 2), (3, 4), (5, 6)])) == [3, 7, 11]
            assert await run(chunks(t.chunk_sum, range(7), 3)) == [[0, 10, 20], [30, 40], [50, 60]]
            assert await run(chunks(t.chunk_sum, range(2), 5)) == [[0], [10]]
            await worker.idle()
    assert t.runs["ident"] == 4
    assert t.runs["add"] == 3
    assert t.runs["chunk_sum"] == 5


# -- failures ----------------------------------------------------------------------------


async def test_a_failing_group_member_raises_its_error_promptly(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = group(t.blocked.s(1), t.boom.s(), t.blocked.s(2)).on_error(t.on_error.s())
            handle = await rt.enqueue(canvas)
            # raised while the other members are still running (they wait for release)
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            # promptly: the error is out while the other members still run (they
            # finish only once the test releases them, below)
            assert t.runs["blocked_done"] == 0
            t.release.set()
            await worker.idle()
    assert info.value.info.type == "ValueError"
    assert info.value.info.reason == f"upstream:{t.errbacks[0][0]}"
    assert t.runs["on_error"] == 1
    assert t.runs["blocked"] == t.runs["blocked_done"] == 2


async def test_a_failing_chord_member_fails_the_chord_promptly_and_the_body_never_runs(
        rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chord([t.blocked.s(1), t.boom.s(), t.blocked.s(2)], t.tsum.s()).on_error(
                t.on_error.s())
            handle = await rt.enqueue(canvas)
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            assert t.runs["blocked_done"] == 0  # promptly: the other members still run
            t.release.set()
            await worker.idle()
            failed_member = t.errbacks[0][0]
            with pytest.raises(TaskError, match="boom") as member_info:
                await rt.handle(failed_member).result(timeout=LIMIT)
    assert info.value.info.type == "ValueError"
    assert info.value.info.reason == f"upstream:{failed_member}"
    assert member_info.value.info.reason == "failed"
    assert t.runs["tsum"] == 0  # the body never ran
    assert t.runs["on_error"] == 1
    assert t.runs["blocked"] == t.runs["blocked_done"] == 2


async def test_a_chord_errback_runs_once_when_several_members_fail(rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chord([t.boom.s(), t.boom.s(), t.add.s(1, 1)], t.tsum.s()).on_error(
                t.on_error.s())
            with pytest.raises(TaskError, match="boom"):
                await run(canvas)
            await worker.idle()
    assert t.runs["boom"] == 2
    assert t.runs["on_error"] == 1
    assert t.runs["tsum"] == 0


async def test_a_chain_stops_at_the_first_failure_and_runs_its_errbacks_once(
        rt: Runtime, t: Tasks) -> None:
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            canvas = chain(t.add.s(1, 1), t.boom.s(), t.add.s(1), t.tsum.s()).on_error(
                t.on_error.s())
            handle = await rt.enqueue(canvas)
            with pytest.raises(TaskError, match="boom") as info:
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert info.value.info.type == "ValueError"
    assert t.runs["add"] == 1  # only the step before the failure
    assert t.runs["boom"] == 1
    assert t.runs["tsum"] == 0
    assert t.runs["on_error"] == 1
    failed_step, error = t.errbacks[0]
    assert info.value.info.reason == f"upstream:{failed_step}"
    assert error == {"type": "ValueError", "message": "boom", "reason": "failed"}


async def test_a_failure_deep_in_a_nested_canvas_reaches_the_outer_handle(
        rt: Runtime, t: Tasks) -> None:
    add, tsum = t.add, t.tsum
    inner = chord([t.boom.s(), add.s(1, 1)], tsum.s())
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue((group(inner, add.s(2, 2)) | tsum.s() | add.s(1)).on_error(
                t.on_error.s()))
            with pytest.raises(TaskError, match="boom"):
                await handle.result(timeout=LIMIT)
            await worker.idle()
    assert t.runs["tsum"] == 0
    assert t.runs["on_error"] == 1


# -- duplicates ----------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_a_chord_body_runs_once_when_every_member_is_delivered_three_times(
        rt: Runtime, t: Tasks, concurrency: int) -> None:
    """Each copy of the last member completes the join again and publishes the
    body again: several copies of the body reach the same worker, one after the
    other (concurrency 1) or at once (8). One of them runs."""
    node = cv.to_node(chord([t.add.s(1, 1), t.add.s(2, 2), t.add.s(3, 3)], t.tsum.s()))
    messages = cv.start(node, rt.registry)
    with anyio.fail_after(LIMIT):
        async with rt:
            await rt.publish([*messages, *messages, *messages])
            async with rt.worker(concurrency=concurrency) as worker:
                assert await rt.handle(cv.final_id(node)).result(timeout=LIMIT) == 12
                await worker.idle()
    assert t.runs["add"] == 9
    assert t.bodies == [[2, 4, 6]]


#: How late the duplicates come: past the life of an at-most-once claim on the
#: worker (``CLAIM_LEASE_S`` where the claim is a lease renewed while running).
LATE_S = getattr(worker_module, "CLAIM_LEASE_S", 6.0) + 2.0




@pytest.mark.parametrize("kind", ["memory"])  # the claim logic is the worker's, not the broker's
async def test_a_late_duplicate_does_not_run_a_finished_chord_body_again(
        rt: Runtime, t: Tasks) -> None:
    """Members delivered again long after the chord finished (a lease that ran
    out on a hung worker, a consumer timeout) complete the join again and
    publish the body again: the body, finished long ago, must not run again."""
    node = cv.to_node(chord([t.add.s(1, 1), t.add.s(2, 2), t.add.s(3, 3)], t.tsum.s()))
    messages = cv.start(node, rt.registry)
    with anyio.fail_after(LIMIT + LATE_S):
        async with rt:
            await rt.publish(messages)
            await rt.publish(messages, delay_s=LATE_S)  # the same members, redelivered late
            async with rt.worker() as worker:
                assert await rt.handle(cv.final_id(node)).result(timeout=LIMIT) == 12
                await worker.idle()  # until the late copies ran too
    assert t.runs["add"] == 6
    assert t.bodies == [[2, 4, 6]]
