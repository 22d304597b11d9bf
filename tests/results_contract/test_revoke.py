"""Revocation: a REVOKED result, and every watching store learns of it."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.messages import State
from runtime.results import CANCELLED
from tests.results_contract.helpers import eventually, ok, started

pytestmark = pytest.mark.result_promise(6)


async def test_revoke_is_seen_by_a_watching_peer(store: Any, peer: Any) -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(peer.watch)
            assert not peer.is_revoked("t1")

            assert await store.revoke("t1") is True

            await eventually(lambda: peer.is_revoked("t1"), what="the peer seeing the revoke")
            assert store.is_revoked("t1")
            assert not peer.is_revoked("t2")
            tg.cancel_scope.cancel()


async def test_watch_loads_revocations_made_before_it_started(store: Any, peer: Any) -> None:
    await store.revoke("t1")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(peer.watch)
            assert peer.is_revoked("t1")
            tg.cancel_scope.cancel()


async def test_revoke_stores_a_revoked_result_and_wakes_waiters(store: Any) -> None:
    await store.put(started("t1"))
    states: list[State] = []

    async def waiter() -> None:
        states.append((await store.wait("t1", timeout=10)).state)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert await store.revoke("t1") is True

    assert states == [State.REVOKED]
    current = await store.get("t1")
    assert current is not None and current.state is State.REVOKED
    assert current.error == CANCELLED


async def test_revoke_after_a_terminal_result_changes_nothing(store: Any) -> None:
    await store.put(ok("t1", "done"))

    assert await store.revoke("t1") is False

    current = await store.get("t1")
    assert current is not None and current.state is State.SUCCESS
    assert not store.is_revoked("t1")
    # ... and a revoked task's own result later is ignored.
    await store.revoke("t2")
    assert await store.put(ok("t2", "too late")) is False
