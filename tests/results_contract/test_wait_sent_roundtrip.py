"""``wait_sent`` (the ``run()`` round trip, promise 11): the store listens
before the task is sent, so a result stored at once is never missed, with no
read of the result key."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from runtime.errors import ResultStoreUnavailable, ResultTimeout
from runtime.messages import Result, State
from tests.conftest import REDIS_URL
from tests.results_contract.conftest import OwnRedis
from tests.results_contract.helpers import eventually, ok
from tests.results_contract.test_redis_store import opened

promise_11 = pytest.mark.result_promise(11)


@promise_11
async def test_a_result_stored_by_send_itself_wakes_the_waiter(store: Any) -> None:
    async def send() -> None:  # the fastest worker: done before send returns
        await store.put(ok("t1", "instant"))

    with anyio.fail_after(10):
        result = await store.wait_sent("t1", 30, send)

    assert (result.state, result.value) == (State.SUCCESS, "instant")


@promise_11
async def test_a_result_stored_by_another_process_wakes_the_waiter(store: Any, peer: Any
                                                                   ) -> None:
    async def send() -> None:
        await peer.put(ok("t1", {"from": "peer"}))

    with anyio.fail_after(10):
        result = await store.wait_sent("t1", 30, send)

    assert result.value == {"from": "peer"}


@promise_11
async def test_a_result_too_big_for_the_message_is_fetched(store: Any) -> None:
    big = "x" * 200_000  # over the 64 KiB that ride in the completion message

    async def send() -> None:
        await store.put(ok("t1", big))

    with anyio.fail_after(10):
        result = await store.wait_sent("t1", 30, send)

    assert result.value == big


@promise_11
async def test_an_error_of_send_propagates_as_is(store: Any) -> None:
    class Refused(Exception):
        pass

    async def send() -> None:
        raise Refused("the broker said no")

    with anyio.fail_after(10), pytest.raises(Refused, match="the broker said no"):
        await store.wait_sent("t1", 30, send)


@promise_11
async def test_no_result_raises_result_timeout_with_the_task_sent(store: Any) -> None:
    sent: list[bool] = []

    async def send() -> None:
        sent.append(True)

    # a real deadline is the point: 0.3 s of waiting, bounded generously
    with anyio.fail_after(10), pytest.raises(ResultTimeout) as caught:
        await store.wait_sent("t1", 0.3, send)

    assert sent == [True]
    assert (caught.value.task_id, caught.value.timeout, caught.value.state) == (
        "t1", 0.3, "PENDING")


@pytest.mark.redis
async def test_an_unreachable_store_raises_before_anything_is_sent(own_redis: OwnRedis
                                                                   ) -> None:
    sent: list[bool] = []

    async def send() -> None:
        sent.append(True)

    async with opened(own_redis.url) as store:
        own_redis.kill()
        with anyio.fail_after(10), pytest.raises(ResultStoreUnavailable):
            await store.wait_sent("t1", 30, send)

    assert sent == []


@pytest.mark.redis
async def test_finished_waits_leave_a_bounded_number_of_channels_subscribed() -> None:
    """Unsubscribes ride with the next subscribe (one write a call), but no
    more than 256 wait for one: 300 waits that end together, with no call
    after them, leave at most 256 channels subscribed."""
    namespace = "wait-sent-bounded"
    n = 300
    async with opened(REDIS_URL, namespace=namespace) as store:
        probe = aioredis.Redis.from_url(REDIS_URL)
        sent = 0
        all_sent = anyio.Event()
        got: list[Any] = []

        async def send() -> None:
            nonlocal sent
            sent += 1
            if sent == n:
                all_sent.set()

        async def call(i: int) -> None:
            result: Result = await store.wait_sent(f"t{i}", 30, send)
            got.append(result.value)

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(call, i)
                    await all_sent.wait()
                    await store.put_many([ok(f"t{i}", i) for i in range(n)])
            assert sorted(got) == list(range(n))

            async def bounded() -> bool:  # the flushed UNSUBSCRIBE reaches Redis
                return len(await probe.pubsub_channels(f"{namespace}:done:*")) <= 256

            await eventually(bounded, what="at most 256 finished waits left subscribed")
        finally:
            await probe.aclose()
