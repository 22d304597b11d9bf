"""Every public entry point raises the library's own exception types (or the
user's own exception as itself), never an ``ExceptionGroup`` of one.

Each test catches the way a user does: ``try: ... except ResultTimeout:``
(and ``except TaskloomError:``) OUTSIDE every context manager the library
provides (``async with rt:``, ``rt.worker()``), so a wrapping group anywhere on
the way out makes the ``except`` miss and the test fail.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

import runtime
from runtime import (
    ArgumentsError,
    ConfigError,
    DecodeError,
    EncodeError,
    EnqueueError,
    NotInTaskError,
    PayloadTooLarge,
    Reject,
    ResultError,
    ResultExpired,
    ResultStoreUnavailable,
    ResultTimeout,
    Runtime,
    SealedResultError,
    Task,
    TaskCancelled,
    TaskDeadLettered,
    TaskError,
    TaskloomError,
    TaskTimeLimitExceeded,
    UnknownTaskError,
    run,
)
from tests.conftest import REDIS_URL
from tests.runtime.helpers import LIMIT

Body = Callable[[], Awaitable[Any]]


async def caught(expected: type[BaseException], body: Body) -> BaseException:
    """Run ``body`` and return what the user's own ``except expected:`` caught."""
    try:
        with anyio.fail_after(LIMIT):
            await body()
    except expected as e:  # the user's except clause, outside every library context manager
        if not issubclass(expected, BaseExceptionGroup):
            assert not isinstance(e, BaseExceptionGroup)
        assert "TaskGroup" not in str(e)
        return e
    raise AssertionError(f"nothing raised; expected {expected.__name__}")


async def caught_both(expected: type[TaskloomError], body: Body) -> TaskloomError:
    """The error is caught by its own type and by the root ``TaskloomError``."""
    first = await caught(expected, body)
    second = await caught(TaskloomError, body)
    assert type(first) is type(second)
    assert isinstance(first, TaskloomError)
    return first


def tasks(rt: Runtime) -> dict[str, Task[Any, Any]]:
    @rt.task(name="add")
    async def add(x: int, y: int) -> int:
        return x + y

    @rt.task(name="anything")
    async def anything(x: Any) -> Any:
        return x

    @rt.task(name="boom")
    async def boom() -> None:
        raise ValueError("boom")

    @rt.task(name="reject")
    async def reject() -> None:
        raise Reject("not today")

    @rt.task(name="slow", timeout=0.05)
    async def slow() -> None:
        await anyio.sleep(LIMIT * 2)

    @rt.task(name="unserved", queue="nobody-consumes-this")
    async def unserved() -> int:
        return 1

    @rt.task(name="nested")
    async def nested(timeout: float) -> int:
        return int(await run(unserved.s(), timeout=timeout))

    return {t.name: t for t in (add, anything, boom, reject, slow, unserved, nested)}


# -- run() ---------------------------------------------------------------------------


async def test_run_raises_result_timeout_itself() -> None:
    rt = Runtime()
    t = tasks(rt)

    async def body() -> None:
        async with rt:
            await run(t["add"].s(1, 2), timeout=0.01)  # no worker: times out

    error = await caught_both(ResultTimeout, body)
    assert isinstance(error, ResultTimeout)
    assert error.timeout == 0.01


async def test_run_raises_encode_error_and_payload_too_large_themselves() -> None:
    rt = Runtime(max_message_bytes=4096)
    t = tasks(rt)

    async def unencodable() -> None:
        async with rt:
            await run(t["anything"].s(object()))

    async def too_big() -> None:
        async with rt:
            await run(t["anything"].s("x" * 10_000))

    await caught_both(EncodeError, unencodable)
    await caught_both(PayloadTooLarge, too_big)
    await caught(EnqueueError, too_big)


async def test_run_raises_the_task_errors_themselves_from_inside_a_worker_block() -> None:
    rt = Runtime()
    t = tasks(rt)

    def in_worker(name: str) -> Body:
        async def body() -> None:
            async with rt, rt.worker():
                await run(t[name].s())
        return body

    failed = await caught_both(TaskError, in_worker("boom"))
    assert isinstance(failed, TaskError) and failed.info.type == "ValueError"
    await caught_both(TaskDeadLettered, in_worker("reject"))
    await caught_both(TaskTimeLimitExceeded, in_worker("slow"))


async def test_bad_input_to_run_and_enqueue_raises_itself() -> None:
    rt = Runtime()
    t = tasks(rt)

    async def bad_args() -> None:
        async with rt, rt.worker():
            await run(t["add"].s("x", 2))

    async def unknown() -> None:
        rt.registry["no.such.task"]  # by name, rt.signature() sends it unchecked

    async def not_a_signature() -> None:
        async with rt:
            await rt.enqueue(42)  # type: ignore[arg-type]

    async def not_connected() -> None:
        await rt.run(t["add"].s(1, 2))

    await caught_both(ArgumentsError, bad_args)
    await caught_both(UnknownTaskError, unknown)
    await caught_both(EnqueueError, not_a_signature)
    await caught(TaskloomError, not_connected)


async def test_run_of_a_task_with_no_runtime_is_a_config_error() -> None:
    async def orphan_fn() -> int:
        return 1

    orphan: Task[[], int] = Task(orphan_fn, name="orphan")
    await caught_both(ConfigError, lambda: run(orphan.s()))


# -- enqueue(), enqueue_many(), handle.result() ----------------------------------------


async def test_enqueue_and_enqueue_many_raise_themselves() -> None:
    rt = Runtime(max_message_bytes=4096)
    t = tasks(rt)

    async def one() -> None:
        async with rt:
            await rt.enqueue(t["anything"].s("x" * 10_000))

    async def many() -> None:
        async with rt:
            await rt.enqueue_many([t["add"].s(1, 2), t["anything"].s(object())])

    await caught_both(PayloadTooLarge, one)
    await caught_both(EncodeError, many)


async def test_handle_result_raises_timeout_and_cancelled_themselves() -> None:
    rt = Runtime()
    t = tasks(rt)

    async def timeout() -> None:
        async with rt:
            handle = await rt.enqueue(t["add"].s(1, 2))
            await handle.result(timeout=0.01)

    async def cancelled() -> None:
        async with rt:
            handle = await rt.enqueue(t["add"].s(1, 2))
            await handle.cancel()
            async with rt.worker():
                await handle.result()

    await caught_both(ResultTimeout, timeout)
    await caught_both(TaskCancelled, cancelled)


# -- the worker block and the user's own exceptions ------------------------------------


async def test_a_users_exception_leaves_the_worker_block_as_itself() -> None:
    rt = Runtime()
    tasks(rt)

    async def body() -> None:
        async with rt, rt.worker():
            raise KeyError("mine")

    error = await caught(KeyError, body)
    assert error.args == ("mine",)


async def test_a_users_exception_group_is_left_as_it_is() -> None:
    rt = Runtime()
    tasks(rt)
    mine = ExceptionGroup("mine", [KeyError("a")])

    async def body() -> None:
        async with rt, rt.worker():
            raise mine

    assert await caught(ExceptionGroup, body) is mine


async def test_async_with_runtime_raises_the_connection_error_itself() -> None:
    rt = Runtime(broker="redis://127.0.0.1:1/0")  # nothing listens on port 1

    async def body() -> None:
        async with rt:
            pass

    error = await caught_both(runtime.errors.BrokerConnectionError, body)
    assert "127.0.0.1:1" in str(error)


# -- nested run() inside a task ----------------------------------------------------------


async def _nested_timeout(rt: Runtime) -> None:
    t = tasks(rt)

    async def body() -> None:
        async with rt, rt.worker(queues=["default"]):
            await run(t["nested"].s(0.05))

    error = await caught_both(TaskError, body)
    assert isinstance(error, TaskError)
    assert error.is_(ResultTimeout), error.info
    assert "TaskGroup" not in error.info.message


async def test_a_nested_run_that_times_out_fails_the_outer_task_with_result_timeout() -> None:
    await _nested_timeout(Runtime())


@pytest.mark.redis
async def test_a_nested_run_that_times_out_on_redis(namespace: str) -> None:
    rt = Runtime(broker=REDIS_URL, namespace=namespace)
    try:
        await _nested_timeout(rt)
    finally:
        async with rt:
            await rt.broker.purge_namespace()  # type: ignore[attr-defined]
            await rt.results.purge_namespace()  # type: ignore[attr-defined]


@pytest.mark.redis
@pytest.mark.fault
async def test_result_store_unavailable_is_raised_itself(namespace: str) -> None:
    from tests.faults.nemesis import TcpProxy

    with TcpProxy(6379) as proxy:
        rt = Runtime(results=f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)
        t = tasks(rt)

        async def body() -> None:
            async with rt:
                handle = await rt.enqueue(t["add"].s(1, 2))
                proxy.set_mode("reset")
                await handle.result(timeout=LIMIT)

        await caught(ResultStoreUnavailable, body)
        proxy.set_mode("pass")
        await caught(ResultError, body)


# -- every exported error is reachable -----------------------------------------------------

#: each public exception type -> the entry point and test above that raises it
REACHABLE: dict[type[BaseException], str] = {
    TaskloomError: "rt.run() before `async with rt:` (test_bad_input_to_run_and_enqueue_raises_itself)",
    ConfigError: "run(sig) of a task with no runtime; Runtime(...) with bad settings",
    EnqueueError: "rt.enqueue(42)",
    UnknownTaskError: "rt.registry['no.such.task']",
    ResultExpired: "handle.result()/status() after the result expired (test_front_door_expired.py)",
    ArgumentsError: "run(add.s('x', 2))",
    EncodeError: "run()/enqueue_many() of an unencodable value",
    PayloadTooLarge: "run()/enqueue() over max_message_bytes",
    ResultError: "handle.result() when the result store resets (base of the next three)",
    ResultTimeout: "run(timeout=...), handle.result(timeout=...)",
    ResultStoreUnavailable: "handle.result() with the Redis result store unreachable",
    SealedResultError: "handle.result() of a result sealed with a key the reader lacks "
                       "(test_encrypted_results.py)",
    TaskError: "run() of a task that raised",
    TaskDeadLettered: "run() of a task that raised Reject",
    TaskTimeLimitExceeded: "run() of a task past its timeout",
    TaskCancelled: "handle.result() after handle.cancel()",
    DecodeError: "rt.codec.decode(bad bytes); a caller sees TaskDeadLettered(reason decode_error)",
    NotInTaskError: "current_task() outside a task (test_current_task_outside_a_task_raises)",
}

#: exported but not raised by any entry point yet, each with what it waits for
NOT_YET: dict[type[BaseException], str] = {}


def test_current_task_outside_a_task_raises() -> None:
    with pytest.raises(NotInTaskError, match="current_task"):
        runtime.current_task()


def test_every_exported_error_is_reachable_from_an_entry_point() -> None:
    exported = {
        obj for name in runtime.__all__
        if inspect.isclass(obj := getattr(runtime, name))
        and issubclass(obj, TaskloomError)
    }
    assert exported == set(REACHABLE) | set(NOT_YET)
    assert not set(REACHABLE) & set(NOT_YET)


def test_decode_error_is_raised_by_the_public_codec() -> None:
    rt = Runtime()
    with pytest.raises(DecodeError) as info:
        rt.codec.decode(b"\x00not json", {"ct": "json"})
    assert info.value.reason == "decode_error"

