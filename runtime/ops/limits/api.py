"""The client side and the operator side of flow control.

``before_enqueue`` (dedup and debounce at enqueue), ``enqueue_paced`` (a batch
published at a rate), ``set_limit`` (change a task's limits at run time) and
``limits_state`` (what the limiters hold now).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from runtime.errors import ConfigError
from runtime.messages import TaskMessage
from runtime.ops.limits.gate import effective, limits_of
from runtime.ops.limits.spec import Limits, Rate, key_value, parse_rate
from runtime.ops.limits.store import store_for, tokens

if TYPE_CHECKING:
    from runtime.app import Runtime, TaskHandle
    from runtime.canvas import Composable

#: A debounce record outlives its countdown by this much (late deliveries still see it).
_DEBOUNCE_MARGIN_MS = 60_000

__all__ = ["Decision", "LimitState", "before_enqueue", "enqueue_paced", "limits_state",
           "set_limit", "store_for"]

class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What ``before_enqueue`` decided: publish ``message`` (maybe delayed), or
    nothing when ``existing_id`` names the first call of a unique key."""

    message: TaskMessage
    existing_id: str | None = None


async def before_enqueue(rt: Runtime, message: TaskMessage, *,
                         limits: Limits | None = None) -> Decision:
    """Dedup and debounce for one task message, before it is published.

    ``unique_for``: the first call of a key within the window claims it (SET NX
    PX, one round trip) and is published; a later one is not published and
    gets ``existing_id`` (the caller returns a handle to it, flagged
    duplicate). ``debounce``: every call is published with its start delayed by
    the quiet period and recorded as its key's latest (one SET); at run time
    the gate drops all but the latest. Tasks with neither cost nothing.
    """
    if limits is None:
        limits = limits_of(rt.registry.get(message.task))
    if limits is None or (limits.unique_for_s is None and limits.debounce_s is None):
        return Decision(message=message)
    task = rt.registry.get(message.task)
    fn = None if task is None else task.fn
    store = store_for(rt)
    if limits.unique_for_s is not None:
        key = key_value(limits.unique_key, fn, message.args, message.kwargs)
        existing = await store.claim_unique(message.task, key, message.id,
                                            int(limits.unique_for_s * 1000))
        return Decision(message=message, existing_id=existing)
    assert limits.debounce_s is not None
    key = key_value(limits.debounce_key, fn, message.args, message.kwargs)
    ttl_ms = int(limits.debounce_s * 2000) + _DEBOUNCE_MARGIN_MS
    await store.mark_latest(message.task, key, message.id, ttl_ms)
    eta_ms = int(time.time() * 1000 + limits.debounce_s * 1000)
    return Decision(message=msgspec.structs.replace(message, eta_ms=max(eta_ms,
                                                                        message.eta_ms or 0)))


async def enqueue_paced(rt: Runtime, targets: Iterable[Composable[Any]], *,
                        rate: str | Rate = "100/s") -> list[TaskHandle[Any]]:
    """Enqueue ``targets`` no faster than ``rate`` from this producer: at most
    ``burst`` per publish, spaced by the rate (a batch of a burst at a time, one
    broker round trip each); never floods the queue however long the list."""
    r = parse_rate(rate, what="rate")
    handles: list[TaskHandle[Any]] = []
    batch: list[Composable[Any]] = []
    start = anyio.current_time()
    sent = 0

    async def flush() -> None:
        nonlocal sent
        # the batch's last item is conformant: it is the (sent + len - 1)-th start
        due = start + max(0, sent + len(batch) - r.burst) * r.interval_ms / 1000
        await anyio.sleep(max(0.0, due - anyio.current_time()))
        handles.extend(await rt.enqueue_many(batch))
        sent += len(batch)
        batch.clear()

    for target in targets:
        batch.append(target)
        if len(batch) >= r.burst:
            await flush()
    if batch:
        await flush()
    return handles


async def set_limit(rt: Runtime, task: str, *, rate_limit: str | None = None,
                    burst: int | None = None, concurrency_limit: int | None = None,
                    clear: bool = False) -> dict[str, Any]:
    """Change a task's limits at run time, for every worker of the app (they
    see it within their overrides cache, a second by default). ``clear``
    returns to the declared limits. Returns the override now stored."""
    if task not in rt.registry:
        raise ConfigError(f"no task named {task!r} in this app; name one of "
                          f"{sorted(t.name for t in rt.registry)}")
    store = store_for(rt)
    if clear:
        await store.set_override(task, None)
        return {}
    values = dict((await store.overrides()).get(task, {}))
    if rate_limit is not None:
        values["rate_limit"] = str(parse_rate(rate_limit, burst=burst))
        values.pop("burst", None)
    if concurrency_limit is not None:
        if not isinstance(concurrency_limit, int) or concurrency_limit < 1:
            raise ConfigError(f"concurrency_limit must be an integer of at least 1, "
                              f"not {concurrency_limit!r}")
        values["concurrency_limit"] = concurrency_limit
    if not values:
        raise ConfigError("give rate_limit=, concurrency_limit= or clear=True")
    await store.set_override(task, values)
    return values


class LimitState(msgspec.Struct, frozen=True, kw_only=True):
    """One limiter as seen now (``kind`` "rate" or "concurrency", ``key`` ""
    for the task-wide one)."""

    kind: str
    task: str
    key: str
    limit: str
    #: rate: starts allowed right now (0..burst)
    tokens: float | None = None
    #: concurrency: permits held by running tasks
    held: int | None = None
    #: deferred tasks due within the last minute or later (waiting in the broker)
    waiting: int = 0
    #: deferrals counted since the limiter was last used a day ago
    deferred: int = 0
    overridden: bool = False


async def limits_state(rt: Runtime) -> list[LimitState]:
    """The state of every limiter used within the last day (one round trip on Redis)."""
    store = store_for(rt)
    overrides = await store.overrides()
    out = []
    for snap in await store.snapshot():
        task = rt.registry.get(snap.task)
        limits = effective(limits_of(task), overrides.get(snap.task), None)
        overridden = snap.task in overrides
        if snap.kind == "rate":
            rate = limits.rate if limits is not None else None
            out.append(LimitState(
                kind="rate", task=snap.task, key=snap.key,
                limit=str(rate) if rate is not None else "?",
                tokens=None if rate is None else tokens(snap.tat_ms, snap.now_ms,
                                                        rate.interval_ms, rate.burst),
                waiting=snap.waiting, deferred=snap.deferred, overridden=overridden))
        else:
            n = limits.concurrency if limits is not None else None
            out.append(LimitState(kind="concurrency", task=snap.task, key=snap.key,
                                  limit=str(n) if n is not None else "?", held=snap.held,
                                  waiting=snap.waiting, deferred=snap.deferred,
                                  overridden=overridden))
    return out
