"""Joins count distinct members; claims are exclusive."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.results_contract.conftest import OpenStore
from tests.results_contract.helpers import eventually


@pytest.mark.result_promise(7)
async def test_join_counts_each_member_once_and_returns_values_in_order(store: Any) -> None:
    assert await store.join("g1", 2, 3, "c") is None
    assert await store.join("g1", 0, 3, {"a": 1}) is None
    assert await store.join("g1", 0, 3, "a again") is None  # a duplicate counts once

    assert await store.join("g1", 1, 3, [2]) == [{"a": 1}, [2], "c"]
    # Every call after completion returns the values (a redelivered member,
    # or a worker that completed the join and crashed before continuing it).
    assert await store.join("g1", 1, 3, "b again") == [{"a": 1}, [2], "c"]
    assert await store.join("g1", 0, 3, None) == [{"a": 1}, [2], "c"]


@pytest.mark.result_promise(7)
async def test_joins_are_independent(store: Any) -> None:
    assert await store.join("g1", 0, 2, "x") is None
    assert await store.join("g2", 1, 2, "y") is None
    assert await store.join("g1", 1, 2, "z") == ["x", "z"]
    assert await store.join("g2", 0, 2, "w") == ["w", "y"]
    assert await store.join("g3", 0, 1, None) == [None]


@pytest.mark.result_promise(7)
async def test_concurrent_members_complete_the_join_exactly_once(store: Any) -> None:
    completions: list[list[Any]] = []

    async def member(i: int) -> None:
        out = await store.join("g1", i, 50, i * 10)
        if out is not None:
            completions.append(out)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(member, i)

    assert completions == [[i * 10 for i in range(50)]]


@pytest.mark.result_promise(7)
async def test_a_join_of_10000_members_completes_once(store: Any) -> None:
    size, lanes = 10_000, 20
    completions: list[list[Any]] = []

    async def lane(first: int) -> None:
        for i in range(first, size, lanes):
            out = await store.join("big", i, size, i)
            if out is not None:
                completions.append(out)

    async with anyio.create_task_group() as tg:
        for first in range(lanes):
            tg.start_soon(lane, first)

    assert len(completions) == 1
    assert completions[0] == list(range(size))
    assert await store.join("big", 0, size, "again") == list(range(size))


@pytest.mark.result_promise(8)
async def test_claim_is_exclusive(store: Any) -> None:
    assert await store.claim("t1", 30) is True
    assert await store.claim("t1", 30) is False
    assert await store.claim("t2", 30) is True


@pytest.mark.result_promise(8)
async def test_concurrent_claims_of_one_id_grant_one(store: Any) -> None:
    grants: list[bool] = []

    async def claim() -> None:
        grants.append(await store.claim("t1", 30))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(claim)

    assert grants.count(True) == 1 and len(grants) == 20


@pytest.mark.result_promise(8)
async def test_a_claim_expires_after_its_ttl(open_store: OpenStore) -> None:
    async with open_store() as s:
        assert await s.claim("t1", 0.2) is True

        async def free_again() -> bool:
            return bool(await s.claim("t1", 30))

        await eventually(free_again, what="the claim expiring")
        assert await s.claim("t1", 30) is False
