"""Storing and reading results: round trips, first terminal wins, TTL."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.errors import EncodeError, PayloadTooLarge
from runtime.messages import ErrorInfo, Result, State
from tests.results_contract.conftest import OpenStore
from tests.results_contract.helpers import eventually, failed, ok, started

VALUES = [
    pytest.param(None, id="none"),
    pytest.param(42, id="int"),
    pytest.param(-2.5, id="float"),
    pytest.param(True, id="bool"),
    pytest.param("héllo", id="str"),
    pytest.param(b"\x00\xffraw", id="bytes"),
    pytest.param([1, "two", [3.0, None]], id="list"),
    pytest.param({"a": 1, "b": {"c": [True, "x"]}}, id="dict"),
    pytest.param(2**62, id="bigint"),
]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.result_promise(1)
async def test_put_then_get_round_trips_the_value(store: Any, value: Any) -> None:
    result = ok("t1", value, task="app.add", attempt=2, delivery_count=3, worker="w1",
                started_ms=1_700_000_000_000)

    assert await store.put(result) is True

    assert await store.get("t1") == result


@pytest.mark.result_promise(1)
async def test_a_failure_round_trips_its_error_info(store: Any) -> None:
    result = Result(id="t1", state=State.FAILURE, task="app.div",
                    error=ErrorInfo(type="ZeroDivisionError", message="division by zero",
                                    traceback="Traceback ...", reason="error"))

    await store.put(result)

    assert await store.get("t1") == result


@pytest.mark.result_promise(1)
async def test_get_of_an_unknown_id_is_none(store: Any) -> None:
    assert await store.get("never-stored") is None


@pytest.mark.result_promise(2)
async def test_the_first_terminal_result_wins(store: Any) -> None:
    assert await store.put(ok("t1", "first")) is True

    assert await store.put(failed("t1")) is False
    assert await store.put(ok("t1", "second")) is False

    current = await store.get("t1")
    assert current is not None
    assert (current.state, current.value) == (State.SUCCESS, "first")


@pytest.mark.result_promise(2)
async def test_a_non_terminal_state_after_a_terminal_one_is_ignored(store: Any) -> None:
    await store.put(failed("t1"))

    assert await store.put(started("t1")) is False
    assert await store.put(Result(id="t1", state=State.RETRY, attempt=2)) is False

    current = await store.get("t1")
    assert current is not None and current.state is State.FAILURE


@pytest.mark.result_promise(2)
async def test_states_advance_until_a_terminal_one(store: Any) -> None:
    assert await store.put(started("t1")) is True
    assert await store.put(Result(id="t1", state=State.RETRY, attempt=1)) is True
    assert await store.put(started("t1")) is True
    assert await store.put(ok("t1", 7)) is True

    current = await store.get("t1")
    assert current is not None and (current.state, current.value) == (State.SUCCESS, 7)


@pytest.mark.result_promise(2)
async def test_put_many_stores_each_result_and_says_which(store: Any) -> None:
    await store.put(ok("done", "earlier"))

    stored = await store.put_many([ok("a", 1), ok("done", "later"), started("b"), failed("c")])

    assert stored == [True, False, True, True]
    got = [await store.get(i) for i in ("a", "done", "b", "c")]
    assert [r.state for r in got] == [State.SUCCESS, State.SUCCESS, State.STARTED,
                                      State.FAILURE]
    assert (got[0].value, got[1].value) == (1, "earlier")
    assert await store.put_many([]) == []


@pytest.mark.result_promise(1)
async def test_concurrent_puts_all_land(store: Any) -> None:
    outcomes: dict[str, bool] = {}

    async def put(i: int) -> None:
        outcomes[f"t{i}"] = await store.put(ok(f"t{i}", i))

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(put, i)

    assert all(outcomes.values()) and len(outcomes) == 300
    for i in (0, 150, 299):
        got = await store.get(f"t{i}")
        assert got is not None and got.value == i


@pytest.mark.result_promise(2)
async def test_concurrent_terminal_puts_of_one_id_store_exactly_one(store: Any) -> None:
    outcomes: list[bool] = []

    async def put(i: int) -> None:
        outcomes.append(await store.put(ok("same", i)))

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(put, i)

    assert outcomes.count(True) == 1
    winner = outcomes.index(True)
    got = await store.get("same")
    assert got is not None and isinstance(got.value, int) and 0 <= winner < 50


@pytest.mark.result_promise(3)
async def test_results_expire_after_the_ttl(open_store: OpenStore) -> None:
    async with open_store(ttl_s=1.0) as short:
        await short.put(ok("t1", "soon gone"))
        assert await short.get("t1") is not None

        async def gone() -> bool:
            return await short.get("t1") is None

        await eventually(gone, what="the result expiring")

        # Once expired, the id is free again: a new terminal result is stored.
        assert await short.put(ok("t1", "again")) is True


@pytest.mark.result_promise(5)
async def test_a_result_over_max_result_bytes_raises_payload_too_large(
        open_store: OpenStore) -> None:
    async with open_store(max_result_bytes=1000) as small:
        with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes") as caught:
            await small.put(ok("t1", "x" * 2000))

        assert caught.value.limit == 1000 and caught.value.size > 1000
        assert await small.get("t1") is None
        # The worker stores a failure instead, which fits.
        assert await small.put(failed("t1", "result too large")) is True


@pytest.mark.result_promise(5)
async def test_a_value_that_cannot_be_encoded_raises_encode_error(store: Any) -> None:
    with pytest.raises(EncodeError, match="t1"):
        await store.put(ok("t1", object()))

    assert await store.get("t1") is None
