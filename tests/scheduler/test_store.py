"""The Redis schedule store's fencing, on the real server: only the lease's
current token can renew it, claim a tick or write a schedule's state, and a
tick is claimed once."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from runtime.ops.scheduler import RedisScheduleStore, ScheduleState
from runtime.ops.scheduler.leader import Leader
from runtime.ops.scheduler.store import Claim
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.redis


@pytest.fixture
async def store(namespace: str) -> AsyncIterator[RedisScheduleStore]:
    s = RedisScheduleStore(REDIS_URL, namespace=namespace)
    async with s:
        try:
            yield s
        finally:
            await s.purge()


async def test_a_stale_token_is_fenced_out(store: RedisScheduleStore) -> None:
    first = await store.acquire(300)
    assert first is not None
    assert await store.acquire(300) is None  # held
    state = ScheduleState(last_tick_ms=1000)
    assert await store.claim_tick(first[0], "s", 1000, state, 60_000) is Claim.CLAIMED
    assert await store.claim_tick(first[0], "s", 1000, state, 60_000) is Claim.TAKEN
    with anyio.fail_after(10):  # the first holder is paused: its lease runs out
        while (second := await store.acquire(300)) is None:
            await anyio.sleep(0.05)
    assert second[1] > first[1]  # the fencing counter only grows
    assert not await store.renew(first[0], 300)
    late = ScheduleState(last_tick_ms=2000)
    assert await store.claim_tick(first[0], "s", 2000, late, 60_000) is Claim.NOT_LEADER
    assert await store.set_state(first[0], "s", late) is Claim.NOT_LEADER
    assert (await store.states())["s"] == state  # the stale leader wrote nothing
    assert await store.claim_tick(second[0], "s", 2000, late, 60_000) is Claim.CLAIMED
    await store.release(first[0])  # a stale release leaves the new lease alone
    assert await store.lease_ttl_ms() > 0
    await store.release(second[0])
    assert await store.lease_ttl_ms() == 0


async def test_a_leader_that_stops_hands_over_at_once(store: RedisScheduleStore) -> None:
    a, b = Leader(store, lease_s=30), Leader(store, lease_s=30)
    async with a.leading() as lease:
        assert lease.fence >= 1
    with anyio.fail_after(5):  # released: no need to wait 30 s for the lease to expire
        async with b.leading() as lease_b:
            assert lease_b.fence > lease.fence
