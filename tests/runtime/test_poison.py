"""Bad input on the wire: dead-lettered with the reason, never executed, and the
worker keeps running. Also results the worker cannot pass on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from brokers.base import Envelope, QueueStats
from runtime import Runtime, State, TaskDeadLettered, TaskError, chain, chord, run
from runtime.codec import Codec
from runtime.messages import TaskMessage
from tests.runtime.helpers import LIMIT, dead_letters, stats

KEYS = {"k1": b"the key"}


def raw(body: bytes, headers: dict[str, str] | None = None, id: str = "raw-1") -> Envelope:
    return Envelope(id=id, queue="default", body=body, headers={"ct": "json"} if headers is None
                    else headers)


def encoded(codec: Codec, **fields: Any) -> Envelope:
    message = TaskMessage(**fields)
    body, headers = codec.encode(message)
    return raw(body, headers, id=message.id)


async def assert_canvas_failed_at_a_step(rt: Runtime, handle: Any, reason: str, cause: str) -> None:
    """The canvas of ``handle`` ended FAILURE because a step could not pass its result
    on: the canvas's error names that step (``upstream:<id>``) and the ``cause``
    (an error type), and the step is dead-lettered with ``reason``."""
    with pytest.raises(TaskError) as failed:
        await handle.result(timeout=LIMIT)
    assert failed.value.task_id == handle.id
    assert await handle.status() is State.FAILURE
    upstream = failed.value.info.reason or ""
    assert upstream.startswith("upstream:"), upstream
    assert failed.value.info.type.endswith(cause), failed.value.info.type
    assert await dead_letters(rt) == [(upstream.removeprefix("upstream:"), reason)]


def register(rt: Runtime) -> tuple[Any, list[Any]]:
    calls: list[Any] = []

    @rt.task(name="add")
    async def add(x: int, y: int) -> int:
        calls.append((x, y))
        return x + y

    return add, calls


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        (raw(b"\x00\xffnot json"), "decode_error"),
        (raw(b'{"id": "x", "task": "add", "args": [1, 2]'), "decode_error"),
        (raw(b'{"id": "x", "task": "add", "args": [1, 2]}', {"ct": "pickle"}), "decode_error"),
        (raw(b'{"id": "x", "task": "add", "args": [1, 2], "v": 99}'), "decode_error"),
        (raw(b"[" * 2_000_000), "too_large"),
    ],
    ids=["garbage", "truncated", "content-type", "version", "oversize"],
)
async def test_undecodable_bytes_are_dead_lettered(rt: Runtime, envelope: Envelope, reason: str) -> None:
    add, calls = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish(envelope)
            await worker.idle()
            assert await dead_letters(rt) == [(envelope.id, reason)]
            assert await run(add.s(1, 2)) == 3  # still working
    assert calls == [(1, 2)]


async def test_a_deeply_nested_body_is_dead_lettered(rt: Runtime) -> None:
    add, calls = register(rt)
    body = b'{"id": "deep", "task": "add", "args": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish(raw(body, id="deep"))
            await worker.idle()
            assert await dead_letters(rt) == [("deep", "decode_error")]
            assert await run(add.s(1, 2), timeout=2) == 3
    assert calls == [(1, 2)]


async def test_an_unknown_task_name_is_dead_lettered(rt: Runtime) -> None:
    add, calls = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish(encoded(rt.codec, id="u1", task="does.not.exist"))
            await worker.idle()
            assert await dead_letters(rt) == [("u1", "unknown_task")]
            with pytest.raises(TaskDeadLettered, match=r"does\.not\.exist") as info:
                await rt.handle("u1").result(timeout=1)
            assert info.value.info.reason == "unknown_task"
            assert await run(add.s(1, 2)) == 3
    assert calls == [(1, 2)]


@pytest.mark.parametrize(
    "fields",
    [
        dict(args=["1", "2"]),
        dict(args=[1]),
        dict(args=[1, 2, 3]),
        dict(args=[1], kwargs={"z": 2}),
    ],
    ids=["types", "missing", "extra", "unknown-kwarg"],
)
async def test_arguments_that_do_not_fit_are_dead_lettered(rt: Runtime, fields: dict[str, Any]) -> None:
    add, calls = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish(encoded(rt.codec, id="b1", task="add", **fields))
            await worker.idle()
            assert await dead_letters(rt) == [("b1", "bad_arguments")]
            with pytest.raises(TaskDeadLettered) as info:
                await rt.handle("b1").result(timeout=1)
            assert info.value.info.reason == "bad_arguments"
            assert await rt.handle("b1").status() is State.FAILURE
            assert await run(add.s(1, 2)) == 3
    assert calls == [(1, 2)]


async def test_bad_signatures_are_dead_lettered_when_signing() -> None:
    rt = Runtime(signing_keys=KEYS)
    _, calls = register(rt)
    signed = encoded(rt.codec, id="s1", task="add", args=[1, 2])
    unsigned = encoded(Codec(), id="s2", task="add", args=[1, 2])
    wrong_key = encoded(Codec(signing_keys={"k1": b"another key"}), id="s3", task="add", args=[1, 2])
    tampered = Envelope(id="s4", queue="default", headers=signed.headers,
                        body=signed.body.replace(b"[1,2]", b"[5,5]"))
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish_many([unsigned, wrong_key, tampered])
            await worker.idle()
            assert sorted(await dead_letters(rt)) == [
                ("s2", "bad_signature"), ("s3", "bad_signature"), ("s4", "bad_signature")]
            await rt.broker.publish(signed)
            assert await rt.handle("s1").result(timeout=LIMIT) == 3
    assert calls == [(1, 2)]


async def test_a_duplicate_delivery_keeps_the_first_result(rt: Runtime) -> None:
    runs: list[int] = []

    @rt.task(name="count")
    async def count() -> int:
        runs.append(1)
        return len(runs)

    message = encoded(rt.codec, id="dup", task="count")
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1) as worker:
            await rt.broker.publish_many([message, message])
            await worker.idle()
            info = await rt.handle("dup").info()
    assert len(runs) == 2  # at least once: both deliveries run ...
    assert info is not None and info.value == 1  # ... and the first terminal result wins


async def test_the_first_terminal_result_wins_over_a_later_failure(rt: Runtime) -> None:
    runs: list[int] = []

    @rt.task(name="once_ok")
    async def once_ok() -> int:
        runs.append(1)
        if len(runs) > 1:
            raise ValueError("second run fails")
        return 1

    message = encoded(rt.codec, id="dup", task="once_ok")
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1) as worker:
            await rt.broker.publish_many([message, message])
            await worker.idle()
            assert await rt.handle("dup").result(timeout=1) == 1
            assert await rt.handle("dup").status() is State.SUCCESS


async def test_a_task_raising_cancelled_error_does_not_stop_the_worker(rt: Runtime) -> None:
    import asyncio

    @rt.task
    async def weird() -> None:
        raise asyncio.CancelledError()

    add, _ = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker(concurrency=1) as worker:
            handle = await rt.enqueue(weird.s())
            with pytest.raises(TaskError):
                await handle.result(timeout=2)
            assert await run(add.s(1, 2), timeout=2) == 3
            await worker.idle()
            assert await stats(rt) == QueueStats(dead=1)


# -- what a worker cannot pass on --------------------------------------------------------


async def test_a_result_too_large_for_the_next_step_fails_the_chain_not_the_worker() -> None:
    rt = Runtime(max_message_bytes=4096)

    @rt.task
    async def big() -> str:
        return "x" * 8000

    @rt.task
    async def size(s: str) -> int:
        return len(s)

    add, _ = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(chain(big.s(), size.s()))
            await assert_canvas_failed_at_a_step(rt, handle, "bad_follow_up", "PayloadTooLarge")
            assert await run(add.s(1, 2)) == 3
            await worker.idle()


async def test_chord_results_too_large_for_the_body_fail_the_chord_not_the_worker() -> None:
    rt = Runtime(max_message_bytes=4096)

    @rt.task
    async def part(i: int) -> str:
        return "x" * 1000

    @rt.task
    async def total(parts: list[str]) -> int:
        return sum(map(len, parts))

    add, _ = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(chord([part.s(i) for i in range(8)], total.s()))
            # the member that completes the chord cannot send the body on
            await assert_canvas_failed_at_a_step(rt, handle, "bad_follow_up", "PayloadTooLarge")
            assert await run(add.s(1, 2)) == 3
            await worker.idle()


async def test_an_unencodable_result_in_a_chain_fails_the_chain_not_the_worker(rt: Runtime) -> None:
    class Opaque:
        pass

    @rt.task
    async def make() -> Any:
        return Opaque()

    @rt.task
    async def use(x: Any) -> int:
        return 1

    add, _ = register(rt)
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            handle = await rt.enqueue(chain(make.s(), use.s()))
            await assert_canvas_failed_at_a_step(rt, handle, "bad_result", "EncodeError")
            assert await run(add.s(1, 2)) == 3
            await worker.idle()


async def test_an_unencodable_result_fails_as_bad_result(rt: Runtime) -> None:
    @rt.task
    async def make() -> Any:
        return object()

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker():
            with pytest.raises(TaskError) as info:
                await run(make.s(), timeout=2)
    assert info.value.info.reason == "bad_result"


async def test_a_bad_replacement_fails_the_task_not_the_worker(rt: Runtime) -> None:
    add, _ = register(rt)

    @rt.task
    async def replace() -> Any:
        return add.s("not", "ints")

    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            with pytest.raises(TaskError) as info:
                await run(replace.s(), timeout=2)
            assert info.value.info.type.endswith("ArgumentsError")
            assert await run(add.s(1, 2)) == 3
            await worker.idle()


@pytest.mark.parametrize("where", ["links", "errbacks"])
async def test_a_follow_up_naming_an_unknown_task_fails_the_canvas_not_the_worker(rt: Runtime,
                                                                                where: str) -> None:
    from runtime.messages import SigNode

    add, _ = register(rt)

    @rt.task(name="fail")
    async def fail() -> None:
        raise ValueError("fails")

    follow = [SigNode(id="next", task="not.here")]
    fields: dict[str, Any] = (dict(task="add", args=[1, 2], links=follow, downstream=["next"])
                              if where == "links" else dict(task="fail", errbacks=follow))
    with anyio.fail_after(LIMIT):
        async with rt, rt.worker() as worker:
            await rt.broker.publish(encoded(rt.codec, id="m1", **fields))
            await worker.idle()
            if where == "links":
                # m1 itself succeeded (its result stands); the canvas fails at the
                # follow-up it could not start, and m1 is dead-lettered as bad_follow_up
                assert await rt.handle("m1").status() is State.SUCCESS
                with pytest.raises(TaskError) as failed:
                    await rt.handle("next").result(timeout=LIMIT)
                assert failed.value.info.type.endswith("UnknownTaskError")
                assert failed.value.info.reason == "upstream:m1"
                assert await dead_letters(rt) == [("m1", "bad_follow_up")]
            else:
                # the failure stands; the errback that cannot run is only logged
                assert await rt.handle("m1").status() is State.FAILURE
                assert await dead_letters(rt) == [("m1", "failed")]
            assert await run(add.s(1, 2), timeout=LIMIT) == 3
