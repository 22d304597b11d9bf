"""Where limiter state lives: Redis (shared by every process) or memory (one process).

Both stores answer the same calls with the same arithmetic; the Redis one does
each check in ONE Lua call (atomic, one round trip). Times are epoch
milliseconds; the Redis store reads Redis's own clock (``TIME``) unless the
caller passes ``now_ms`` (tests), so worker clocks may disagree.

Redis keys (``ns`` is the runtime's namespace; one hash tag per namespace, as
the scheduler's, so a script's keys share a Cluster slot)::

    {ns}:limits:{<ns>}:rate:<task>|<key>      string  GCRA theoretical arrival time (ms), PX
    {ns}:limits:{<ns>}:starts:<task>|<key>    zset    task id -> start (ms), the last period
    {ns}:limits:{<ns>}:sem:<task>|<key>       zset    holder task id -> lease expiry (ms)
    {ns}:limits:{<ns>}:wait:<kind>:<task>|<key>  zset deferred task id -> when it is due (ms);
                                              for a rate: the waiter's reserved slot
    {ns}:limits:{<ns>}:wake:<task>|<key>      string  when the last concurrency waiter is due back (ms)
    {ns}:limits:{<ns>}:hold:<task>|<key>      string  running mean time a permit is held (ms)
    {ns}:limits:{<ns>}:unique:<task>|<key>    string  the first task id, PX unique_for
    {ns}:limits:{<ns>}:debounce:<task>|<key>  string  the latest task id, PX 2 x debounce + 60 s
    {ns}:limits:{<ns>}:overrides              hash    task -> JSON {rate_limit, concurrency_limit}
    {ns}:limits:{<ns>}:stats                  hash    "<kind>|<task>|<key>" -> deferrals
    {ns}:limits:{<ns>}:index                  zset    "<kind>|<task>|<key>" -> last use (ms)

A rate waiter does not compete again for the bucket: the check that defers it
RESERVES the next free slot (the ``rate`` TAT advances by one interval) and
records it in the waiting zset; when it comes back at that slot it runs (one
deferral per waiting task, however many wait). Starts themselves are logged
for one period (``starts``, with ``Check.count``): a start that would make
the last period hold more than ``count + burst - 1`` (waiters the delay store
hands back late in a bunch) is sent back once more, until the window allows
it plus an interval per waiter of an earlier slot, keeping its slot. Lateness
is not lost (the slots keep the rate) and never bunches past the window. A
waiter that never comes back costs its one slot, as if it had run. A concurrency waiter is sent back
for when its turn is expected: waiters of one key are spaced by the key's mean
hold / limit (the mean of the holds given back, but at least the youngest
holder's age, so that an unknown or stale mean errs long after a few rounds;
at least ``retry_ms`` apart), each after the last one sent back, so they come
back one at a time instead of all at once; one that finds no free permit goes
to the back. A waiter that dies only lets its turn pass. ``wake`` and ``hold``
are additive keys (old workers ignore them; a key without them is idle).

Everything is bounded: rate keys expire once the bucket is full again, waiting
entries a minute after they were due, index entries (and their stats) a day
after their last use; a holder's lease lapses unless renewed.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import anyio
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex

from brokers.redis.scripts import exchange, pack_command
from runtime.errors import ConfigError, ResultStoreUnavailable
from runtime.ops.common import redis_errors
from runtime.ops.limits.scripts import (
    ADMIT_SCRIPT,
    EARLY_MS,
    HOLD_WEIGHT,
    RELEASE_SCRIPT,
    RENEW_SCRIPT,
    SNAPSHOT_SCRIPT,
    SPACING,
    UNIQUE_SCRIPT,
    WAIT_KEEP_MS,
)

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["ADMIT", "CONCURRENCY", "RATE", "SUPERSEDED", "Check", "LimitStore", "LimitsUnavailable",
           "MemoryLimitStore", "RedisLimitStore", "Snapshot", "store_for"]

#: Statuses of :meth:`LimitStore.admit`.
ADMIT, RATE, CONCURRENCY, SUPERSEDED = 0, 1, 2, 3
_MAX_CONNECTIONS = 16


class LimitsUnavailable(ResultStoreUnavailable):
    """The limiter's Redis cannot be reached; the check can be retried."""


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One admission check: which limiters apply to one delivery."""

    task: str
    holder: str
    #: limiter key of the rate limit (None: no rate limit)
    rate_key: str | None = None
    interval_ms: float = 0.0
    burst: int = 1
    #: starts per period (0: starts are not checked against a window)
    count: int = 0
    #: limiter key of the concurrency limit (None: none)
    sem_key: str | None = None
    limit: int = 0
    lease_ms: int = 30_000
    #: the least spacing of a key's concurrency waiters coming back (ms)
    retry_ms: int = 5
    #: limiter key of a debounce (None: none)
    debounce_key: str | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The raw state of one limiter (``kind`` is "rate" or "concurrency")."""

    kind: str
    task: str
    key: str
    #: rate: the GCRA theoretical arrival time (ms), 0 when idle
    tat_ms: float = 0.0
    #: concurrency: live holders
    held: int = 0
    waiting: int = 0
    deferred: int = 0
    now_ms: float = 0.0


class LimitStore(Protocol):
    shared: bool

    async def admit(self, check: Check, now_ms: float | None = None) -> tuple[int, Any]:
        """(ADMIT, 0), (RATE | CONCURRENCY, delay ms) or (SUPERSEDED, latest id)."""
        ...

    async def release(self, task: str, sem_key: str, holder: str,
                      hold_ms: float | None = None) -> None:
        """Give back ``holder``'s permit; ``hold_ms`` (how long it was held)
        feeds the key's mean hold, which spaces the key's waiters."""
        ...
    async def renew(self, held: Sequence[tuple[str, str, str]], lease_ms: int,
                    now_ms: float | None = None) -> None: ...
    async def claim_unique(self, task: str, key: str, task_id: str, ttl_ms: int,
                           now_ms: float | None = None) -> str | None: ...
    async def mark_latest(self, task: str, key: str, task_id: str, ttl_ms: int,
                          now_ms: float | None = None) -> None: ...
    async def overrides(self) -> dict[str, dict[str, Any]]: ...
    async def set_override(self, task: str, values: dict[str, Any] | None) -> None: ...
    async def snapshot(self, now_ms: float | None = None) -> list[Snapshot]: ...
    async def aclose(self) -> None: ...


def _member(kind: str, task: str, key: str) -> str:
    return f"{kind}|{task}|{key}"


def _split(member: str) -> tuple[str, str, str]:
    kind, task, key = [*member.split("|", 2), "", ""][:3]
    return kind, task, key


# -- memory ------------------------------------------------------------------------------------


class MemoryLimitStore:
    """The embedded default: limits hold within this process only."""

    shared = False

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        #: epoch milliseconds
        self.clock = clock or (lambda: time.time() * 1000.0)
        #: rate: the GCRA of reservations, and the starts of the last period
        self._tat: dict[tuple[str, str], float] = {}
        self._starts: dict[tuple[str, str], list[float]] = {}
        self._sem: dict[tuple[str, str], dict[str, float]] = {}
        #: concurrency: when the last waiter of a key is due back; mean hold (ms)
        self._wake: dict[tuple[str, str], float] = {}
        self._hold: dict[tuple[str, str], float] = {}
        self._wait: dict[str, dict[str, float]] = {}
        self._stats: dict[str, int] = {}
        self._index: dict[str, float] = {}
        self._strings: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._overrides: dict[str, dict[str, Any]] = {}

    def _defer(self, member: str, holder: str, now: float, delay: float,
               score: float | None = None) -> None:
        waiting = self._wait.setdefault(member, {})
        waiting[holder] = now + delay if score is None else score
        for h, due in list(waiting.items()):
            if due < now - WAIT_KEEP_MS:
                del waiting[h]
        self._stats[member] = self._stats.get(member, 0) + 1
        self._index[member] = now

    def _ran(self, member: str, holder: str, now: float) -> None:
        self._wait.get(member, {}).pop(holder, None)
        self._index[member] = now

    async def admit(self, check: Check, now_ms: float | None = None) -> tuple[int, Any]:
        now = self.clock() if now_ms is None else now_ms
        if check.debounce_key is not None:
            latest = self._string("debounce", check.task, check.debounce_key, now)
            if latest is not None and latest != check.holder:
                return SUPERSEDED, latest
        took = False
        if check.sem_key is not None:
            member = _member("concurrency", check.task, check.sem_key)
            holders = self._sem.setdefault((check.task, check.sem_key), {})
            for h, until in list(holders.items()):
                if until <= now:
                    del holders[h]
            if check.holder not in holders and len(holders) >= check.limit:
                delay = self._turn(check, now)
                self._defer(member, check.holder, now, delay)
                return CONCURRENCY, delay
            took = check.holder not in holders
            holders[check.holder] = now + check.lease_ms
            self._ran(member, check.holder, now)
        if check.rate_key is not None:
            wait_ms = self._rate(check, check.rate_key, now)
            if wait_ms > 0:
                if took and check.sem_key is not None:
                    self._sem[(check.task, check.sem_key)].pop(check.holder, None)
                return RATE, wait_ms
        return ADMIT, 0

    def _rate(self, check: Check, key: str, now: float) -> float:
        """0 (it starts) or how long it waits; the twin of the Lua's rate part."""
        member, interval = _member("rate", check.task, key), check.interval_ms
        waiting = self._wait.get(member, {})
        slot = waiting.get(check.holder)
        if slot is None:  # reserve this caller the next free slot (now, if free)
            tat = max(self._tat.get((check.task, key), now), now)
            slot = tat - (check.burst - 1) * interval
            self._tat[(check.task, key)] = tat + interval
        wait_ms = slot - now
        if wait_ms <= EARLY_MS:  # its slot has come: it starts unless the window is full
            most, period = check.count + check.burst - 1, check.count * interval
            starts = [t for t in self._starts.get((check.task, key), []) if t > now - period]
            wait_ms = 0.0
            if check.count > 0 and len(starts) >= most:
                wait_ms = starts[len(starts) - most] + period - now + 0.001
            if wait_ms <= 0:
                self._starts[(check.task, key)] = [*starts, now] if check.count > 0 else []
                self._ran(member, check.holder, now)
                return 0.0
            wait_ms += interval * sum(1 for s in waiting.values() if s < slot)
        self._defer(member, check.holder, now, wait_ms, slot)
        return wait_ms

    def _turn(self, check: Check, now: float) -> float:
        """The delay of a concurrency waiter: after the last one, spaced by the
        key's mean hold / limit."""
        key = (check.task, check.sem_key or "")
        youngest = max(self._sem[key].values()) - check.lease_ms
        hold = max(self._hold.get(key, 0.0), now - youngest)
        wake = max(self._wake.get(key, now), now) + max(hold * SPACING / check.limit, check.retry_ms)
        self._wake[key] = wake
        return wake - now

    async def release(self, task: str, sem_key: str, holder: str,
                      hold_ms: float | None = None) -> None:
        self._sem.get((task, sem_key), {}).pop(holder, None)
        if hold_ms is not None:
            old = self._hold.get((task, sem_key))
            self._hold[(task, sem_key)] = hold_ms if old is None else \
                old + HOLD_WEIGHT * (hold_ms - old)

    async def renew(self, held: Sequence[tuple[str, str, str]], lease_ms: int,
                    now_ms: float | None = None) -> None:
        now = self.clock() if now_ms is None else now_ms
        for task, key, holder in held:
            holders = self._sem.get((task, key), {})
            if holder in holders:
                holders[holder] = now + lease_ms

    def _string(self, kind: str, task: str, key: str, now: float) -> str | None:
        found = self._strings.get((kind, task, key))
        if found is None or found[1] <= now:
            self._strings.pop((kind, task, key), None)
            return None
        return found[0]

    async def claim_unique(self, task: str, key: str, task_id: str, ttl_ms: int,
                           now_ms: float | None = None) -> str | None:
        now = self.clock() if now_ms is None else now_ms
        existing = self._string("unique", task, key, now)
        if existing is not None:
            return existing
        self._strings[("unique", task, key)] = (task_id, now + ttl_ms)
        return None

    async def mark_latest(self, task: str, key: str, task_id: str, ttl_ms: int,
                          now_ms: float | None = None) -> None:
        now = self.clock() if now_ms is None else now_ms
        self._strings[("debounce", task, key)] = (task_id, now + ttl_ms)
        if len(self._strings) > 100_000:  # bounded: forget the expired ones
            self._strings = {k: v for k, v in self._strings.items() if v[1] > now}

    async def overrides(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._overrides.items()}

    async def set_override(self, task: str, values: dict[str, Any] | None) -> None:
        if values:
            self._overrides[task] = dict(values)
        else:
            self._overrides.pop(task, None)

    async def snapshot(self, now_ms: float | None = None) -> list[Snapshot]:
        now = self.clock() if now_ms is None else now_ms
        out = []
        for member in sorted(self._index):
            kind, task, key = _split(member)
            waiting = sum(1 for due in self._wait.get(member, {}).values()
                          if due >= now - WAIT_KEEP_MS)
            held = sum(1 for until in self._sem.get((task, key), {}).values() if until > now)
            out.append(Snapshot(kind=kind, task=task, key=key,
                                tat_ms=self._tat.get((task, key), 0.0) if kind == "rate" else 0.0,
                                held=held if kind == "concurrency" else 0, waiting=waiting,
                                deferred=self._stats.get(member, 0), now_ms=now))
        return out

    async def aclose(self) -> None:
        return None


# -- Redis -------------------------------------------------------------------------------------

class RedisLimitStore:
    """Limiter state on Redis, shared by every process of an app.

    The connection pool opens lazily on first use and again after ``aclose``.
    Every Redis error leaves as :class:`LimitsUnavailable`.
    """

    shared = True

    def __init__(self, url: str, *, namespace: str = "") -> None:
        if "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace {namespace!r} must not contain '{{' or '}}': they "
                              "would break the Redis Cluster hash tags of the keys")
        self.url = url
        ns = namespace or "taskloom"
        self.base = f"{ns}:limits:{{{ns}}}:"
        self.overrides_key = self.base + "overrides"
        self.stats_key = self.base + "stats"
        self.index_key = self.base + "index"
        self._redis: aioredis.Redis | None = None
        #: script source -> its SHA1
        self._scripts: dict[str, str] = {}

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            # bounded, as the result store's: callers beyond it queue for a connection
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=_MAX_CONNECTIONS, timeout=5, protocol=2,
                socket_timeout=5, socket_connect_timeout=5)
            self._redis = aioredis.Redis.from_pool(pool)
        return self._redis

    async def aclose(self) -> None:
        client, self._redis = self._redis, None
        self._scripts.clear()
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _errors(self, doing: str) -> AbstractContextManager[None]:
        return redis_errors(LimitsUnavailable, self.url, doing)

    async def _eval(self, source: str, keys: Sequence[str], args: Sequence[Any],
                    doing: str) -> Any:
        """One script call: packed once and sent in one exchange (the broker's lean
        path: redis-py's Script costs about twice the client CPU per call), loaded
        first when Redis does not know it (``NOSCRIPT``); an error reply raises."""
        with self._errors(doing):
            client = self._client()
            sha = self._scripts.get(source)
            if sha is None:
                sha = self._scripts[source] = hashlib.sha1(source.encode()).hexdigest()
            packed = [pack_command(("EVALSHA", sha, len(keys), *keys, *args))]
            reply = (await exchange(client, packed, 1))[0]
            if isinstance(reply, rex.NoScriptError):
                await client.script_load(source)
                reply = (await exchange(client, packed, 1))[0]
            if isinstance(reply, Exception):
                raise reply
            return reply

    def _key(self, kind: str, task: str, key: str) -> str:
        return f"{self.base}{kind}:{task}|{key}"

    async def admit(self, check: Check, now_ms: float | None = None) -> tuple[int, Any]:
        task, sem, rate = check.task, check.sem_key or "", check.rate_key or ""
        keys = [self._key("debounce", task, check.debounce_key or ""),
                self._key("sem", task, sem), self._key("wait:concurrency", task, sem),
                self._key("rate", task, rate), self._key("wait:rate", task, rate),
                self.stats_key, self.index_key, self._key("wake", task, sem),
                self._key("hold", task, sem), self._key("starts", task, rate)]
        args = ["" if now_ms is None else repr(float(now_ms)), check.holder,
                check.limit if check.sem_key is not None else 0, check.lease_ms,
                repr(check.interval_ms) if check.rate_key is not None else 0, check.burst,
                _member("concurrency", task, sem), _member("rate", task, rate), check.retry_ms,
                "1" if check.debounce_key is not None else "0", check.count]
        status, value = await self._eval(ADMIT_SCRIPT, keys, args, f"check the limits of {task!r}")
        status = int(status)
        text = value.decode() if isinstance(value, bytes) else str(value)
        return (status, text) if status == SUPERSEDED else (status, float(text))

    async def release(self, task: str, sem_key: str, holder: str,
                      hold_ms: float | None = None) -> None:
        await self._eval(RELEASE_SCRIPT, [self._key("sem", task, sem_key),
                                    self._key("hold", task, sem_key)],
                         [holder, "" if hold_ms is None else repr(float(hold_ms))],
                         f"release a concurrency permit of {task!r}")

    async def renew(self, held: Sequence[tuple[str, str, str]], lease_ms: int,
                    now_ms: float | None = None) -> None:
        if not held:
            return
        keys = [self._key("sem", task, key) for task, key, _ in held]
        args = ["" if now_ms is None else repr(float(now_ms)), lease_ms,
                *(holder for _, _, holder in held)]
        await self._eval(RENEW_SCRIPT, keys, args, "renew concurrency permits")

    async def claim_unique(self, task: str, key: str, task_id: str, ttl_ms: int,
                           now_ms: float | None = None) -> str | None:
        found = await self._eval(UNIQUE_SCRIPT, [self._key("unique", task, key)],
                                 ["", task_id, max(1, int(ttl_ms))],
                                 f"claim the unique key of {task!r}")
        if found is None:
            return None
        return found.decode() if isinstance(found, bytes) else str(found)

    async def mark_latest(self, task: str, key: str, task_id: str, ttl_ms: int,
                          now_ms: float | None = None) -> None:
        with self._errors(f"record the latest call of {task!r}"):
            await self._client().set(self._key("debounce", task, key), task_id,
                                     px=max(1, int(ttl_ms)))

    async def overrides(self) -> dict[str, dict[str, Any]]:
        with self._errors("read the limit overrides"):
            raw = await self._client().hgetall(self.overrides_key)
        out: dict[str, dict[str, Any]] = {}
        for k, v in raw.items():
            try:
                out[k.decode() if isinstance(k, bytes) else k] = msgspec.json.decode(v)
            except msgspec.DecodeError:
                continue  # unreadable: ignored (set it again to fix)
        return out

    async def set_override(self, task: str, values: dict[str, Any] | None) -> None:
        with self._errors(f"change the limits of {task!r}"):
            if values:
                await self._client().hset(self.overrides_key, task,
                                          msgspec.json.encode(values))
            else:
                await self._client().hdel(self.overrides_key, task)

    async def snapshot(self, now_ms: float | None = None) -> list[Snapshot]:
        reply = await self._eval(SNAPSHOT_SCRIPT, [self.index_key, self.stats_key],
                                 ["" if now_ms is None else repr(float(now_ms)), self.base],
                                 "read the limiter state")
        text = [r.decode() if isinstance(r, bytes) else str(r) for r in reply]
        now = float(text[0])
        out = []
        for i in range(1, len(text), 4):
            kind, task, key = _split(text[i])
            state = float(text[i + 1])
            out.append(Snapshot(kind=kind, task=task, key=key,
                                tat_ms=state if kind == "rate" else 0.0,
                                held=int(state) if kind == "concurrency" else 0,
                                waiting=int(text[i + 2]), deferred=int(text[i + 3]), now_ms=now))
        return out

    async def purge(self) -> int:
        """Delete every limiter key of this namespace (SCAN + UNLINK); for tests."""
        deleted, cursor = 0, 0
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.base) + "*"
        with self._errors("purge the limiter state"):
            client = self._client()
            while True:
                cursor, keys = await client.scan(cursor, match=pattern, count=1000)
                if keys:
                    deleted += await client.unlink(*keys)
                if int(cursor) == 0:
                    return deleted


def tokens(tat_ms: float, now_ms: float, interval_ms: float, burst: int) -> float:
    """How many starts a GCRA bucket allows right now (0..burst)."""
    if interval_ms <= 0:
        return float(burst)
    free = (now_ms - (max(tat_ms, now_ms) - burst * interval_ms)) / interval_ms
    return max(0.0, min(float(burst), math.floor(free + 1e-9)))


_STORES: weakref.WeakKeyDictionary[Any, LimitStore] = weakref.WeakKeyDictionary()


def store_for(rt: Runtime) -> LimitStore:
    """The limiter store of ``rt`` (one per runtime): its result store's Redis,
    else its Redis broker's, else memory (limits hold within this process)."""
    found = _STORES.get(rt)
    if found is None:
        from runtime.results.redis import RedisResultStore

        results = rt.results
        url = getattr(rt.broker, "url", None)
        if isinstance(results, RedisResultStore):
            found = RedisLimitStore(results.url, namespace=results.namespace)
        elif isinstance(url, str) and urlsplit(url).scheme in ("redis", "rediss", "unix"):
            found = RedisLimitStore(url, namespace=rt.namespace)
        else:
            found = MemoryLimitStore()
        _STORES[rt] = found
    return found
