"""The scheduler loop: publish each due tick once, while this process leads.

Every scheduler process keeps a view of the schedules, reloaded when the
store's version changes (a pub/sub notification on Redis, an event in memory).
The one that holds the lease (see ``leader``) computes the due ticks of each
schedule from its persisted ``last_tick``, applies the misfire policy, and for
each tick to publish:

1. claims the tick and records it as the schedule's last tick, in one Lua call
   that first checks the lease still holds this leader's token (fencing);
2. only if the claim is new, publishes it with ``rt.enqueue(sig, task_id=...)``
   where the task id is ``sched:<name>:<tick epoch ms>``.

Then it sleeps until the next tick is due or the schedules change; nothing
polls. A leader that lost its lease claims nothing, so it publishes nothing.

Misfire policy (when ticks were missed: no scheduler ran, or the leader was
down): a tick is *on time* when it is published within ``grace_s`` of its
time. ``skip`` (default) publishes the latest due tick only if it is on time
and drops the others; ``run_once`` publishes the latest due tick, late or not;
``run_all`` publishes every missed tick, oldest first, at most ``max_catchup``
(the newest ones). A new schedule has no missed ticks before it was created.

A crash between the claim and the publish loses that one tick (it is never run
twice); a publish that fails is retried a few times with the same task id.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.abc
import msgspec
import structlog

from runtime.errors import ConfigError, ResultStoreUnavailable, TaskloomError
from runtime.ops.api import events_of
from runtime.ops.events import TickEvent
from runtime.ops.scheduler.leader import Leader, Lease
from runtime.ops.scheduler.rules import _from_ms, _ms
from runtime.ops.scheduler.store import Claim, ScheduleDef, ScheduleState, ScheduleStore

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.canvas import Signature

__all__ = ["Clock", "Scheduler", "SystemClock", "check_name", "task_id_for"]

log = structlog.get_logger("taskloom.scheduler")

_NAME = re.compile(r"^[\w.:@/-]{1,200}$")
_PUBLISH_TRIES = 3
_RETRY_S = 1.0


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"schedule name {name!r} is not valid: use 1-200 letters, digits "
                          "and . _ : @ / - (it becomes part of task ids and Redis keys)")
    return name


def task_id_for(name: str, tick: datetime) -> str:
    """The task id of a schedule's tick: the same in every process."""
    return f"sched:{name}:{_ms(tick)}"


class Clock(Protocol):
    """Where the scheduler reads the time (inject one in tests)."""

    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return at (or soon after) ``when``."""
        ...


class SystemClock:
    """The wall clock; sleeps are re-checked by the loop, so clock jumps are absorbed."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        await anyio.sleep(max(0.0, (when - self.now()).total_seconds()))


def signature_of(rt: Runtime, defn: ScheduleDef) -> Signature:
    sig = rt.signature(defn.task, *defn.args, **defn.kwargs)
    return sig.set(**defn.options) if defn.options else sig


class Scheduler:
    """Publishes the ticks of the schedules in ``store`` while it leads.

    ``declared`` schedules (from the code) are written on start; a pause made
    at run time is kept, since pauses are stored apart from definitions.
    """

    def __init__(self, rt: Runtime, store: ScheduleStore, *, clock: Clock | None = None,
                 lease_s: float = 10.0, grace_s: float = 2.0,
                 declared: Iterable[ScheduleDef] = (), name: str = "") -> None:
        if not 0 <= grace_s < math.inf:
            raise ConfigError(f"grace_s must be a non-negative number of seconds, not {grace_s!r}")
        self.rt = rt
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.grace_s = grace_s
        self.leader = Leader(store, lease_s=lease_s, name=name)
        self.declared = list(declared)
        self.name = name
        #: The schedules as this process last saw them, and which are paused.
        self.view: dict[str, ScheduleDef] = {}
        self.paused: set[str] = set()
        self.version = -1
        #: Whether this process leads now, and when its loop sleeps until (for tests).
        self.leading = False
        self.sleeping_until: datetime | None = None
        self.published = 0
        self._states: dict[str, ScheduleState] = {}
        self._wake = anyio.Event()
        self._claim_ttl_ms = int(max(600.0, 3 * lease_s) * 1000)

    # -- the view ------------------------------------------------------------------------

    async def reload(self) -> None:
        version, defs, paused = await self.store.load()
        self.view, self.paused = defs, paused
        if version != self.version:
            self.version = version
            self._wake.set()

    async def _watch(self) -> None:
        while True:
            try:
                await self.store.changed(self.version)
                await self.reload()
            except ResultStoreUnavailable as e:
                log.warning("cannot watch the schedules; trying again", error=str(e))
                await anyio.sleep(_RETRY_S)

    async def _sync_declared(self) -> None:
        for defn in self.declared:
            await self.store.put(defn)  # keeps created_ms; pauses live elsewhere

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Run until cancelled: watch the schedules, lead when elected."""
        async with self.store:
            await self._sync_declared()
            await self.reload()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch)
                task_status.started()
                while True:
                    async with self.leader.leading() as lease:
                        self.leading = True
                        try:
                            await self._lead(lease)
                        finally:
                            self.leading = False
                            self.sleeping_until = None

    async def _lead(self, lease: Lease) -> None:
        """Publish due ticks until the lease is lost (returns) or cancelled."""
        while True:
            try:
                self._states = await self.store.states()
                break
            except ResultStoreUnavailable as e:
                log.warning("cannot read the schedules' last runs; trying again", error=str(e))
                await anyio.sleep(_RETRY_S)
        while True:
            self._wake = anyio.Event()
            now = self.clock.now()
            wake_at: datetime | None = None
            for name, defn in list(self.view.items()):
                if name in self.paused:
                    continue
                try:
                    fire = await self._handle(lease, defn, now)
                except _LostLease:
                    log.warning("scheduler lost its lease before publishing; stepping down",
                                scheduler=self.name, fence=lease.fence)
                    return
                except ResultStoreUnavailable as e:
                    log.warning("cannot reach the schedule store; trying again",
                                schedule=name, error=str(e))
                    fire = now + timedelta(seconds=_RETRY_S)
                if fire is not None and (wake_at is None or fire < wake_at):
                    wake_at = fire
            await self._sleep(wake_at)

    async def _sleep(self, until: datetime | None) -> None:
        self.sleeping_until = until
        wake = self._wake
        async with anyio.create_task_group() as tg:
            async def woken() -> None:
                await wake.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(woken)
            if until is not None:
                await self.clock.sleep_until(until)
                tg.cancel_scope.cancel()
        self.sleeping_until = None

    async def _handle(self, lease: Lease, defn: ScheduleDef, now: datetime) -> datetime | None:
        """Publish what is due of ``defn`` now; when its next tick fires."""
        rule, name = defn.rule, defn.name
        state = self._states.get(name, ScheduleState())
        last_ms = state.last_tick_ms if state.last_tick_ms is not None else defn.created_ms - 1
        last = _from_ms(last_ms)
        latest = rule.prev_at_or_before(now)
        if latest is not None and rule.fire_at(name, latest) > now:  # its jitter is still running
            latest = rule.prev_at_or_before(latest - timedelta(milliseconds=1))
        if latest is not None and latest > last:
            late = (now - rule.fire_at(name, latest)).total_seconds()
            ticks: list[datetime] = []
            if defn.misfire == "run_all":
                t: datetime | None = latest
                while t is not None and t > last and len(ticks) < defn.max_catchup:
                    ticks.append(t)
                    t = rule.prev_at_or_before(t - timedelta(milliseconds=1))
                ticks.reverse()
            elif defn.misfire == "run_once" or late <= self.grace_s:
                ticks = [latest]
            if ticks:
                for tick in ticks:
                    await self._publish(lease, defn, tick, now)
            else:
                log.info("schedule missed its ticks; skipping them (misfire=skip)", schedule=name,
                         latest=latest.isoformat(), late_s=round(late, 3))
                state = msgspec.structs.replace(state, last_tick_ms=_ms(latest),
                                                skipped=state.skipped + 1, fence=lease.fence)
                if await self.store.set_state(lease.token, name, state) is Claim.NOT_LEADER:
                    raise _LostLease
                self._states[name] = state
            last = latest
        nxt = rule.next_after(max(last, latest or last))
        return None if nxt is None else rule.fire_at(name, nxt)

    async def _publish(self, lease: Lease, defn: ScheduleDef, tick: datetime, now: datetime
                       ) -> None:
        name = defn.name
        task_id = task_id_for(name, tick)
        try:
            sig = signature_of(self.rt, defn)
        except TaskloomError as e:  # unknown task here, arguments that no longer fit
            log.error("cannot build a schedule's task; fix or remove the schedule",
                      schedule=name, error=str(e))
            return
        old = self._states.get(name, ScheduleState())
        state = ScheduleState(last_tick_ms=_ms(tick), last_run_ms=_ms(now), last_task_id=task_id,
                              skipped=old.skipped, fence=lease.fence)
        claim = await self.store.claim_tick(lease.token, name, _ms(tick), state,
                                            self._claim_ttl_ms)
        if claim is Claim.NOT_LEADER:
            raise _LostLease
        self._states[name] = state
        if claim is Claim.TAKEN:
            log.info("tick already published by another leader", schedule=name, task_id=task_id)
            return
        for attempt in range(1, _PUBLISH_TRIES + 1):
            try:
                await self.rt.enqueue(sig, task_id=task_id)
            except TaskloomError as e:
                log.error("could not publish a schedule's tick", schedule=name, task_id=task_id,
                          attempt=attempt, error=str(e))
                if attempt < _PUBLISH_TRIES:
                    await anyio.sleep(_RETRY_S * attempt)
                continue
            self.published += 1
            log.info("schedule tick", schedule=name, task_id=task_id, tick=tick.isoformat(),
                     fence=lease.fence)
            stream = events_of(self.rt)
            if stream is not None:  # the runtime keeps an event stream: the tick is an event
                stream.publish(TickEvent(schedule=name, task_id=task_id, tick_ms=_ms(tick),
                                         at_ms=_ms(self.clock.now())))
            return


class _LostLease(Exception):
    """Internal: a fenced write was refused."""
