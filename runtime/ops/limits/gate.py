"""The worker side: ``LimitsGate``, a :class:`runtime.admission.Gate`.

For a task with no limit ``admit`` returns ``None`` without I/O. For a limited
task it makes ONE store call (one Lua round trip on Redis) that checks the
debounce, takes a concurrency permit and spends a rate token together; ``done``
gives the permit back (one round trip, only for concurrency-limited tasks);
``serve`` renews the leases of running holders every third of the lease in one
call. Run-time overrides are read at most once a second (one HGETALL per
worker per second, not per task).

A deferred task waits in the broker's delay store. For a rate, the check that
defers it reserves its own GCRA slot (see ``store``): it waits exactly until
that slot and then runs without competing again, so each waiting task is
deferred about once, however many wait (no stampede at every slot). For a
concurrency limit, the waiters of a key are sent back one after another, spaced
by the key's mean hold time / limit (at least the youngest holder's age / limit,
and at least ``retry_s`` apart), plus up to 10 % jitter; one that still finds no permit goes
to the back. Each key has its own semaphore and bucket, so a busy key never
delays another key's tasks; within one key a waiter that comes back when a
permit is free takes it, whoever it is (rate waiters are served in order).

Debounce: a call that is not the latest of its key is revoked in the result
store (its handle raises ``TaskCancelled``; the latest call's id is logged) and
sent back briefly, so that the worker's own revocation check settles it REVOKED
without running it; the latest call runs after the quiet period.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from runtime.errors import ConfigError, TaskloomError
from runtime.messages import TaskMessage
from runtime.ops.limits.spec import Limits, key_value, parse_rate
from runtime.ops.limits.store import (
    ADMIT,
    CONCURRENCY,
    RATE,
    Check,
    LimitStore,
    LimitsUnavailable,
    store_for,
)

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.registry import Task

__all__ = ["HEADER_CONCURRENCY", "HEADER_RATE", "SUPERSEDED_DELAY_S", "LimitsGate", "call_headers",
           "limits_of"]

log = structlog.get_logger("taskloom.limits")

#: Per-call overrides ride in the message's headers (no wire-format change).
HEADER_RATE = "taskloom-rate-limit"
HEADER_CONCURRENCY = "taskloom-concurrency-limit"
#: A debounced call that is not its key's latest is revoked, then sent back for
#: this long: the worker's revocation check (before the gates) then settles it
#: REVOKED without running it, once the revocation has reached the worker.
SUPERSEDED_DELAY_S = 0.2


def call_headers(*, rate_limit: str | None = None,
                 concurrency_limit: int | None = None) -> dict[str, str]:
    """Headers that override a task's limits for one call (``.set(rate_limit=...)``)."""
    out = {}
    if rate_limit is not None:
        out[HEADER_RATE] = str(parse_rate(rate_limit, what="rate_limit"))
    if concurrency_limit is not None:
        if not isinstance(concurrency_limit, int) or concurrency_limit < 1:
            raise ConfigError(f"concurrency_limit must be an integer of at least 1, "
                              f"not {concurrency_limit!r}")
        out[HEADER_CONCURRENCY] = str(concurrency_limit)
    return out


def limits_of(task: Task[Any, Any] | None) -> Limits | None:
    """The limits declared on a task (the ``limits`` attribute the registry
    gives it), if any."""
    found = getattr(task, "limits", None)
    return found if isinstance(found, Limits) else None


def effective(limits: Limits | None, override: dict[str, Any] | None,
              headers: dict[str, str] | None) -> Limits | None:
    """The limits that apply: the call's headers over the run-time override
    over the declaration. A bad override is logged and ignored."""
    changes: dict[str, Any] = {}
    for source in (override or {}, _from_headers(headers or {})):
        try:
            if source.get("rate_limit") is not None:
                changes["rate"] = parse_rate(str(source["rate_limit"]), burst=source.get("burst"))
            if source.get("concurrency_limit") is not None:
                n = int(source["concurrency_limit"])
                if n < 1:
                    raise ConfigError("concurrency_limit must be at least 1")
                changes["concurrency"] = n
        except (ConfigError, ValueError, TypeError) as e:
            log.warning("a limit override cannot be read; ignoring it", error=str(e))
    if not changes:
        return limits
    return msgspec.structs.replace(limits or Limits(), **changes)


def _from_headers(headers: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if HEADER_RATE in headers:
        out["rate_limit"] = headers[HEADER_RATE]
    if HEADER_CONCURRENCY in headers:
        out["concurrency_limit"] = headers[HEADER_CONCURRENCY]
    return out


class LimitsGate:
    """Rate limits, concurrency limits and debounce for one worker."""

    def __init__(
        self,
        rt: Runtime,
        store: LimitStore | None = None,
        *,
        retry_s: float = 0.005,
        overrides_ttl_s: float = 1.0,
        limits: Callable[[str], Limits | None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.rt = rt
        self.store: LimitStore = store if store is not None else store_for(rt)
        self.retry_s = retry_s
        self.overrides_ttl_s = overrides_ttl_s
        self._declared = limits or (lambda name: limits_of(rt.registry.get(name)))
        #: the registry's lookup, for the no-limit path (None: a ``limits`` callable decides)
        self._task = rt.registry.get if limits is None else None
        self._rng = rng or random.Random()
        #: task id -> (task, semaphore key, lease ms, monotonic s when taken) of the
        #: permits this worker holds
        self.holding: dict[str, tuple[str, str, int, float]] = {}
        #: deferrals by reason ("rate", "concurrency") and debounced drops, for the stats
        self.deferred: dict[str, int] = {"rate": 0, "concurrency": 0, "debounced": 0}
        self._overrides: dict[str, dict[str, Any]] = {}
        self._overrides_at = -math.inf
        #: serve() reads the overrides in the background: admit() never waits on them
        self._refreshing = False

    @property
    def deferred_total(self) -> int:
        return self.deferred["rate"] + self.deferred["concurrency"]

    def _stale(self) -> bool:
        """Whether a task must read the overrides itself: they are
        ``overrides_ttl_s`` old and :meth:`serve` is not reading them."""
        return (not self._refreshing
                and time.monotonic() - self._overrides_at >= self.overrides_ttl_s)

    async def _current_overrides(self) -> dict[str, dict[str, Any]]:
        if self._stale():
            await self._read_overrides()
        return self._overrides

    async def _read_overrides(self) -> None:
        self._overrides_at = time.monotonic()  # a failed read is not retried at every task
        try:
            self._overrides = await self.store.overrides()
        except LimitsUnavailable as e:
            # keep the last known overrides: a task without limits must not
            # wait on a limiter store it does not need
            log.warning("cannot read the limit overrides; keeping the last known ones",
                        error=str(e))

    def _unlimited(self, message: TaskMessage) -> bool:
        """True when ``message`` surely has no limit: none declared on its task,
        none set at run time (as last read), none in its headers. No I/O, no
        await: the path of every task a limited app runs without limits."""
        if message.task in self._overrides:
            return False
        headers = message.headers
        if headers and (HEADER_RATE in headers or HEADER_CONCURRENCY in headers):
            return False
        if self._task is not None:  # limits_of inlined: this runs for every task
            found = getattr(self._task(message.task), "limits", None)
            return not isinstance(found, Limits) or not found.gated
        declared = self._declared(message.task)
        return declared is None or not declared.gated

    def _fn(self, name: str) -> Callable[..., Any] | None:
        task = self.rt.registry.get(name)
        return None if task is None else task.fn

    async def check_for(self, message: TaskMessage) -> Check | None:
        """The store check a delivery needs (None: none)."""
        overrides = await self._current_overrides()
        limits = effective(self._declared(message.task), overrides.get(message.task),
                           message.headers)
        if limits is None or not limits.gated:
            return None
        fn = self._fn(message.task)
        rate = limits.rate
        return Check(
            task=message.task, holder=message.id,
            rate_key=None if rate is None else key_value(limits.rate_key, fn, message.args,
                                                         message.kwargs),
            interval_ms=0.0 if rate is None else rate.interval_ms,
            burst=1 if rate is None else rate.burst, count=0 if rate is None else rate.count,
            sem_key=None if limits.concurrency is None else key_value(
                limits.concurrency_key, fn, message.args, message.kwargs),
            limit=limits.concurrency or 0, lease_ms=int(limits.lease_s * 1000),
            retry_ms=int(self.retry_s * 1000),
            debounce_key=None if limits.debounce_s is None else key_value(
                limits.debounce_key, fn, message.args, message.kwargs))

    async def admit(self, message: TaskMessage, /) -> float | None:
        if self._stale():
            await self._read_overrides()
        if self._unlimited(message):
            return None
        try:
            check = await self.check_for(message)
        except ConfigError as e:
            # a key the call cannot give (a key callable that raised, an argument
            # that is missing): deferring would loop forever, so it runs unlimited
            log.error("the limiter key of a task cannot be computed; running it without "
                      "its limits (fix the task's rate_key/concurrency_key/debounce_key)",
                      task_id=message.id, task=message.task, error=str(e))
            return None
        if check is None:
            return None
        status, value = await self.store.admit(check)
        if status == ADMIT:
            if check.sem_key is not None:
                self.holding[message.id] = (check.task, check.sem_key, check.lease_ms,
                                            time.monotonic())
            return None
        if status == RATE:
            self.deferred["rate"] += 1
            # exactly until its reserved slot: it does not compete when it comes back
            return float(value) / 1000
        if status == CONCURRENCY:
            self.deferred["concurrency"] += 1
            return float(value) / 1000 * self._rng.uniform(1.0, 1.1)
        self.deferred["debounced"] += 1
        await self.rt.results.revoke(message.id)
        log.info("dropping a debounced call: a later call of its key runs instead",
                 task_id=message.id, task=message.task, latest_id=str(value))
        return SUPERSEDED_DELAY_S

    async def done(self, message: TaskMessage, /) -> None:
        if not self.holding:
            return
        held = self.holding.pop(message.id, None)
        if held is not None:
            await self.store.release(held[0], held[1], message.id,
                                     hold_ms=(time.monotonic() - held[3]) * 1000)

    async def renew_once(self) -> None:
        by_lease: dict[int, list[tuple[str, str, str]]] = {}
        for task_id, (task, key, lease_ms, _) in list(self.holding.items()):
            by_lease.setdefault(lease_ms, []).append((task, key, task_id))
        for lease_ms, held in by_lease.items():
            await self.store.renew(held, lease_ms)

    async def serve(self) -> None:
        """Read the run-time overrides every ``overrides_ttl_s`` and renew the
        leases of running holders every third of the shortest lease, until
        cancelled (the worker's stop).

        A task's ``admit`` then never waits on the overrides: a read in the
        middle of a batch of tasks that do not suspend would suspend one of
        them, and the worker's fetch and settle batches, split in two, would
        stay split (twice the round trips per task)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresh)
                await self._renew()
        finally:
            self._refreshing = False
            await self.store.aclose()

    async def _refresh(self) -> None:
        self._refreshing = True
        while True:
            try:
                await self._read_overrides()
            except Exception as e:  # never the worker's end: keep the last known ones
                log.error("reading the limit overrides failed; keeping the last known ones",
                          error_type=type(e).__name__, error=str(e)[:300])
            await anyio.sleep(self.overrides_ttl_s)

    async def _renew(self) -> None:
        while True:
            leases = [lease for _, _, lease, _ in self.holding.values()]
            await anyio.sleep(min(leases, default=3000) / 3000)
            try:
                await self.renew_once()
            except TaskloomError as e:
                log.warning("cannot renew concurrency permits; they lapse with their lease "
                            "unless Redis comes back", error=str(e), held=len(self.holding))
