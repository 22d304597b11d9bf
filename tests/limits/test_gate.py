"""The gate a worker asks, on the in-process store: keys from the message's
arguments, run-time overrides and per-call headers, permits given back in done()."""

from __future__ import annotations

import uuid

import pytest

from runtime.app import Runtime
from runtime.messages import TaskMessage
from runtime.ops.limits import (
    Limits,
    LimitsGate,
    MemoryLimitStore,
    call_headers,
    limits_state,
    set_limit,
)


def msg(task: str, *args: object, headers: dict[str, str] | None = None) -> TaskMessage:
    return TaskMessage(id=uuid.uuid4().hex, task=task, args=list(args), headers=headers or {})


@pytest.fixture
def rt() -> Runtime:
    rt = Runtime()

    @rt.task(name="send")
    async def send(user_id: str, body: str) -> None: ...

    @rt.task(name="rebuild")
    async def rebuild(tenant: str) -> None: ...

    @rt.task(name="free")
    async def free() -> None: ...

    send.limits = Limits.of(rate_limit="1/m", rate_key="user_id", fn=send.fn)  # type: ignore[attr-defined]
    rebuild.limits = Limits.of(concurrency_limit=1, concurrency_key="tenant")  # type: ignore[attr-defined]
    return rt


async def test_a_rate_per_key_defers_only_that_key(rt: Runtime) -> None:
    gate = LimitsGate(rt, MemoryLimitStore())
    assert await gate.admit(msg("send", "u1", "a")) is None
    delay = await gate.admit(msg("send", "u1", "b"))
    assert delay is not None and 55 < delay < 61  # its GCRA slot, a minute after the first
    assert await gate.admit(msg("send", "u2", "c")) is None
    assert await gate.admit(msg("free")) is None  # no limit: no check at all
    assert gate.deferred == {"rate": 1, "concurrency": 0, "debounced": 0}


async def test_a_permit_is_held_until_done(rt: Runtime) -> None:
    gate = LimitsGate(rt, MemoryLimitStore(), retry_s=0.5)
    first = msg("rebuild", "t1")
    assert await gate.admit(first) is None
    delay = await gate.admit(msg("rebuild", "t1"))
    # no hold time known yet: retry_s / limit, plus up to 10 % jitter
    assert delay is not None and 0.5 <= delay <= 0.55
    assert await gate.admit(msg("rebuild", "t2")) is None  # another tenant is not starved
    await gate.done(first)
    assert await gate.admit(msg("rebuild", "t1")) is None
    await gate.renew_once()  # renews what is held, without error


async def test_limits_change_at_run_time_and_per_call(rt: Runtime) -> None:
    gate = LimitsGate(rt, overrides_ttl_s=0.0)
    assert await gate.admit(msg("free")) is None
    await set_limit(rt, "free", rate_limit="1/h")
    assert await gate.admit(msg("free")) is None
    assert await gate.admit(msg("free")) is not None  # the override applies
    await set_limit(rt, "free", clear=True)
    assert await gate.admit(msg("free")) is None
    # a call may carry its own limit in its headers (what .set(rate_limit=...) sends)
    headers = call_headers(concurrency_limit=1)
    one = msg("free", headers=headers)
    assert await gate.admit(one) is None
    assert await gate.admit(msg("free", headers=headers)) is not None
    states = {(s.kind, s.task, s.key): s for s in await limits_state(rt)}
    assert states[("concurrency", "free", "")].held == 1
    assert states[("rate", "free", "")].deferred == 1


async def test_a_key_that_cannot_be_computed_runs_the_task_rather_than_loop(rt: Runtime) -> None:
    task = rt.registry["free"]
    task.limits = Limits.of(concurrency_limit=1, concurrency_key=lambda: 1 / 0)  # type: ignore[attr-defined]
    gate = LimitsGate(rt, MemoryLimitStore())
    assert await gate.admit(msg("free")) is None
    assert await gate.admit(msg("free")) is None  # unlimited, logged


@pytest.mark.redis
async def test_an_unreachable_store_defers_limited_tasks_only(rt: Runtime) -> None:
    from runtime.ops.limits import LimitsUnavailable, RedisLimitStore

    store = RedisLimitStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    gate = LimitsGate(rt, store)
    try:
        assert await gate.admit(msg("free")) is None  # needs no limiter: runs
        with pytest.raises(LimitsUnavailable):  # the worker defers it and logs
            await gate.admit(msg("rebuild", "t1"))
    finally:
        await store.aclose()
