"""Expiry told apart from absence (promise 9) and reserving ids (promise 10)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.errors import ResultExpired, ResultTimeout
from runtime.messages import State
from runtime.results.base import MARKER_EXTRA_MAX_S, MARKER_EXTRA_MIN_S, marker_ttl_s
from tests.results_contract.conftest import OpenStore
from tests.results_contract.helpers import eventually, ok, started

#: far longer than the test's own bound: only an at-once answer passes
LONG_WAIT = 600.0
#: generous bound for an answer that needs one or two round trips
AT_ONCE = 5.0


async def _expire(store: Any, task_id: str) -> None:
    async def gone() -> bool:
        return await store.get(task_id) is None

    await eventually(gone, what=f"the record of {task_id} expiring")


@pytest.mark.result_promise(9)
async def test_waiting_on_an_expired_result_raises_result_expired_at_once(
        open_store: OpenStore) -> None:
    async with open_store(ttl_s=1.0) as short:
        await short.put(ok("t1", "soon gone"))
        await _expire(short, "t1")

        with anyio.fail_after(AT_ONCE):
            with pytest.raises(ResultExpired, match=r"t1.*expired.*result_ttl") as caught:
                await short.wait("t1", timeout=LONG_WAIT)
            with pytest.raises(ResultExpired):
                await short.wait("t1", timeout=0)
        assert caught.value.task_id == "t1"
        assert await short.expired("t1")


@pytest.mark.result_promise(9)
async def test_a_live_a_never_seen_and_a_never_finished_id_are_not_expired(
        open_store: OpenStore) -> None:
    async with open_store(ttl_s=1.0) as short:
        await short.put(started("running"))  # not terminal: no marker
        await _expire(short, "running")
        async with open_store() as store:
            await store.put(ok("live", 1))
            assert not await store.expired("live")
            assert (await store.wait("live", timeout=AT_ONCE)).value == 1
        assert not await short.expired("never")
        assert not await short.expired("running")
        with pytest.raises(ResultTimeout):
            await short.wait("running", timeout=0.05)


@pytest.mark.result_promise(9)
async def test_the_marker_is_set_by_put_many_and_revoke_too(open_store: OpenStore) -> None:
    async with open_store(ttl_s=1.0) as short:
        await short.put_many([ok("m1"), ok("m2")])
        await short.revoke("r1")
        for task_id in ("m1", "m2", "r1"):
            await _expire(short, task_id)
            assert await short.expired(task_id), task_id


@pytest.mark.result_promise(9)
async def test_the_marker_outlives_the_result_within_bounds(store: Any) -> None:
    assert store.marker_ttl_s == marker_ttl_s(store.ttl_s)
    day = 24 * 3600.0
    assert marker_ttl_s(1.0) == 1.0 + MARKER_EXTRA_MIN_S
    assert marker_ttl_s(day) == 2 * day
    assert marker_ttl_s(30 * day) == 30 * day + MARKER_EXTRA_MAX_S


@pytest.mark.result_promise(10)
async def test_reserve_puts_a_pending_record_only_where_none_is(store: Any) -> None:
    assert await store.reserve(["a", "b"]) == [True, True]
    # taken: reserved already, or a repeat within one call
    assert await store.reserve(["a", "c", "c"]) == [False, True, False]
    record = await store.get("a")
    assert record is not None and record.state is State.PENDING
    await store.put(started("b"))
    await store.put(ok("d", 4))
    assert await store.reserve(["b", "d"]) == [False, False]
    assert (await store.get("d")).value == 4  # a reservation never overwrites
    assert await store.reserve([]) == []


@pytest.mark.result_promise(10)
async def test_a_reserved_id_is_waited_on_and_stored_as_usual(store: Any) -> None:
    assert await store.reserve(["w"]) == [True]
    with pytest.raises(ResultTimeout) as caught:
        await store.wait("w", timeout=0.05)
    assert caught.value.state == "PENDING"
    assert await store.put(ok("w", "done")) is True
    with anyio.fail_after(AT_ONCE):
        assert (await store.wait("w", timeout=AT_ONCE)).value == "done"


@pytest.mark.result_promise(10)
async def test_release_deletes_only_a_bare_reservation(store: Any) -> None:
    assert await store.reserve(["free", "taken", "done"]) == [True, True, True]
    await store.put(started("taken"))
    await store.put(ok("done"))
    await store.release(["free", "taken", "done", "never"])
    assert await store.get("free") is None
    assert (await store.get("taken")).state is State.STARTED
    assert (await store.get("done")).state is State.SUCCESS
    assert await store.reserve(["free"]) == [True]


@pytest.mark.result_promise(10)
async def test_concurrent_reserves_of_one_id_grant_one(store: Any, peer: Any) -> None:
    granted: list[bool] = []

    async def reserve(s: Any) -> None:
        granted.extend(await s.reserve(["same"]))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(reserve, store if i % 2 else peer)
    assert granted.count(True) == 1 and len(granted) == 50


@pytest.mark.result_promise(10)
async def test_a_reservation_expires_with_the_ttl(open_store: OpenStore) -> None:
    async with open_store(ttl_s=1.0) as short:
        assert await short.reserve(["x"]) == [True]
        await _expire(short, "x")
        assert not await short.expired("x")  # a reservation is not a finished task
        assert await short.reserve(["x"]) == [True]
