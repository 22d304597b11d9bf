"""The public face of the scheduler: ``Schedules`` and ``run_scheduler``.

    schedules = schedules_for(rt)          # one per runtime (wired as ``rt.schedules``)
    schedules.declare("health", health.s(), every(timedelta(seconds=30)))   # from code
    await schedules.add("cleanup-7", cleanup.s(7), cron("*/15 * * * *"))    # at run time
    await schedules.pause("cleanup-7"); await schedules.resume("cleanup-7")
    await schedules.remove("cleanup-7")
    for info in await schedules.list(): ...

    await run_scheduler(rt)                # any number of processes; one leads

Where schedules live: on the Redis of the runtime's result store (or of its
Redis broker), under the runtime's namespace; otherwise in memory, which only
works within one process: ``run_scheduler(rt, multiprocess=True)`` (what the
CLI passes) refuses it with a ``ConfigError`` rather than run duplicates.
"""

from __future__ import annotations

import weakref
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

import anyio
import anyio.abc
import msgspec

from runtime.canvas import Signature
from runtime.errors import ConfigError, TaskloomError
from runtime.ops.scheduler.rules import Rule, _from_ms, _ms
from runtime.ops.scheduler.scheduler import Clock, Scheduler, SystemClock, check_name
from runtime.ops.scheduler.store import (
    MemoryScheduleStore,
    Misfire,
    RedisScheduleStore,
    ScheduleDef,
    ScheduleStore,
)

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["ScheduleInfo", "ScheduleNotFound", "Schedules", "run_scheduler", "schedules_for",
           "store_for"]

_MISFIRE = ("skip", "run_once", "run_all")


class ScheduleNotFound(TaskloomError, LookupError):
    """No schedule of that name is stored."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}; see `taskloom schedules APP` for the "
                         "stored ones, or add it with rt.schedules.add()")


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``Schedules.list()``."""

    name: str
    task: str
    rule: str
    misfire: str
    paused: bool
    source: str
    next_run: datetime | None
    last_run: datetime | None
    #: The state of the last tick's task (SUCCESS, FAILURE, PENDING...), None if none ran.
    last_outcome: str | None
    last_task_id: str | None


def store_for(rt: Runtime, *, multiprocess: bool = False) -> ScheduleStore:
    """The schedule store of ``rt``: its result store's Redis, else its Redis
    broker's, else memory (refused when ``multiprocess``)."""
    from runtime.results.redis import RedisResultStore

    results = rt.results
    if isinstance(results, RedisResultStore):
        return RedisScheduleStore(results.url, namespace=results.namespace)
    url = getattr(rt.broker, "url", None)
    if isinstance(url, str) and urlsplit(url).scheme in ("redis", "rediss", "unix"):
        return RedisScheduleStore(url, namespace=rt.namespace)
    if multiprocess:
        raise ConfigError(
            "the scheduler needs a store shared by its processes to elect one leader, and this "
            "runtime keeps results in memory: several scheduler processes would each publish "
            "every tick. Give the runtime a Redis result store "
            "(Runtime(..., results='redis://host:6379/0')) or run the scheduler embedded in "
            "one process")
    return MemoryScheduleStore()


class Schedules:
    """The schedules of one runtime: declare from code, change at run time, list."""

    def __init__(self, rt: Runtime, store: ScheduleStore | None = None, *,
                 clock: Clock | None = None) -> None:
        self.rt = rt
        self.store: ScheduleStore = store if store is not None else store_for(rt)
        #: Stamps new schedules (no tick before a schedule's creation is "missed").
        self.clock: Clock = clock or SystemClock()
        self.declared: dict[str, ScheduleDef] = {}

    async def __aenter__(self) -> Self:
        await self.store.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.store.__aexit__(exc_type, exc, tb)

    def _define(self, name: str, signature: Signature, rule: Rule, misfire: Misfire,
                max_catchup: int, source: str) -> ScheduleDef:
        check_name(name)
        if not isinstance(signature, Signature):
            raise ConfigError(f"schedule {name!r} takes a signature (task.s(...)), not "
                              f"{type(signature).__qualname__}; wrap a canvas in a task")
        if signature.errbacks:
            raise ConfigError(f"schedule {name!r}: a scheduled signature cannot carry errbacks")
        if misfire not in _MISFIRE:
            raise ConfigError(f"misfire must be one of {', '.join(_MISFIRE)}, not {misfire!r}")
        if max_catchup < 1:
            raise ConfigError(f"max_catchup must be at least 1, not {max_catchup!r}")
        signature.task.bind(signature.args, signature.kwargs)  # ArgumentsError now, not later
        try:
            args = msgspec.to_builtins(list(signature.args))
            kwargs = msgspec.to_builtins(signature.kwargs)
        except TypeError as e:
            raise ConfigError(f"schedule {name!r}: its arguments cannot be stored ({e}); pass "
                              "JSON-like values") from None
        return ScheduleDef(name=name, task=signature.task.name, rule=rule, args=args,
                           kwargs=kwargs, options=msgspec.structs.asdict(signature.options)
                           if signature.options != type(signature.options)() else {},
                           misfire=misfire, max_catchup=max_catchup, source=source,
                           created_ms=_ms(self.clock.now()))

    def declare(self, name: str, signature: Signature, rule: Rule, *, misfire: Misfire = "skip",
                max_catchup: int = 100) -> None:
        """A schedule from the code: stored when a scheduler starts (its pause, if
        any was made at run time, is kept)."""
        self.declared[name] = self._define(name, signature, rule, misfire, max_catchup, "code")

    async def add(self, name: str, signature: Signature, rule: Rule, *, misfire: Misfire = "skip",
                  max_catchup: int = 100) -> None:
        """Store a schedule (or change the one of that name); every scheduler sees it."""
        defn = self._define(name, signature, rule, misfire, max_catchup, "api")
        async with self.store:
            await self.store.put(defn)

    async def pause(self, name: str) -> bool:
        """Pause ``name`` (idempotent); ``ScheduleNotFound`` if there is none."""
        async with self.store:
            if not await self.store.set_paused(name, True):
                raise ScheduleNotFound(name)
        return True

    async def resume(self, name: str) -> bool:
        """Resume ``name`` (idempotent); missed ticks follow its misfire policy."""
        async with self.store:
            if not await self.store.set_paused(name, False):
                raise ScheduleNotFound(name)
        return True

    async def remove(self, name: str) -> bool:
        """Remove ``name``; whether it existed. A schedule declared in code
        comes back when a scheduler starts: remove it from the code too."""
        async with self.store:
            return await self.store.remove(name)

    async def list(self, *, now: datetime | None = None) -> list[ScheduleInfo]:
        """Every stored schedule with its next run, last run and that run's outcome."""
        now = now or self.clock.now()
        async with self.store:
            _, defs, paused = await self.store.load()
            states = await self.store.states()
        out = []
        for name in sorted(defs):
            d, st = defs[name], states.get(name)
            last_tick = _from_ms(st.last_tick_ms) if st and st.last_tick_ms is not None else None
            nxt = d.rule.next_after(max(now, last_tick) if last_tick else now)
            outcome = await self._outcome(st.last_task_id if st else None)
            out.append(ScheduleInfo(
                name=name, task=d.task, rule=d.rule.describe(), misfire=d.misfire,
                paused=name in paused, source=d.source,
                next_run=None if nxt is None else d.rule.fire_at(name, nxt),
                last_run=_from_ms(st.last_run_ms) if st and st.last_run_ms is not None else None,
                last_outcome=outcome, last_task_id=st.last_task_id if st else None))
        return out

    async def _outcome(self, task_id: str | None) -> str | None:
        if task_id is None:
            return None
        try:
            found = await self.rt.results.get(task_id)
        except TaskloomError:
            return "UNKNOWN"
        return "PENDING" if found is None else found.state.name


_BY_RUNTIME: weakref.WeakKeyDictionary[Any, Schedules] = weakref.WeakKeyDictionary()


def schedules_for(rt: Runtime) -> Schedules:
    """The one ``Schedules`` of ``rt`` (what ``rt.schedules`` returns)."""
    found = _BY_RUNTIME.get(rt)
    if found is None:
        found = _BY_RUNTIME[rt] = Schedules(rt)
    return found


async def run_scheduler(rt: Runtime, *, clock: Clock | None = None, lease_s: float = 10.0,
                        grace_s: float = 2.0, multiprocess: bool = False, name: str = "",
                        task_status: anyio.abc.TaskStatus[Scheduler] = anyio.TASK_STATUS_IGNORED
                        ) -> None:
    """Run a scheduler for ``rt`` until cancelled; any number may run, one leads.

    ``multiprocess=True`` (the CLI) refuses a store that other processes cannot
    share. ``lease_s`` bounds how long a killed leader's ticks wait for the next
    leader; ``grace_s`` is how late a tick may be and still count as on time.
    ``task_status.started()`` gets the ``Scheduler`` (for its ``view``).
    """
    schedules = schedules_for(rt)
    if multiprocess and not schedules.store.shared:
        store_for(rt, multiprocess=True)  # raises the ConfigError that says what to do
    scheduler = Scheduler(rt, schedules.store, clock=clock, lease_s=lease_s, grace_s=grace_s,
                          declared=schedules.declared.values(), name=name)
    async with rt:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            task_status.started(scheduler)
