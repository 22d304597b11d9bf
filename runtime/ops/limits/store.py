"""Where limiter state lives: Redis (shared by every process) or memory (one process).

Both stores answer the same calls with the same arithmetic; the Redis one does
each check in ONE Lua call (atomic, one round trip). Times are epoch
milliseconds; the Redis store reads Redis's own clock (``TIME``) unless the
caller passes ``now_ms`` (tests), so worker clocks may disagree.

Redis keys (``ns`` is the runtime's namespace; one hash tag per namespace, as
the scheduler's, so a script's keys share a Cluster slot)::

    {ns}:limits:{<ns>}:rate:<task>|<key>      string  GCRA theoretical arrival time (ms), PX
    {ns}:limits:{<ns>}:sem:<task>|<key>       zset    holder task id -> lease expiry (ms)
    {ns}:limits:{<ns>}:wait:<kind>:<task>|<key>  zset deferred task id -> when it is due (ms)
    {ns}:limits:{<ns>}:unique:<task>|<key>    string  the first task id, PX unique_for
    {ns}:limits:{<ns>}:debounce:<task>|<key>  string  the latest task id, PX 2 x debounce + 60 s
    {ns}:limits:{<ns>}:overrides              hash    task -> JSON {rate_limit, concurrency_limit}
    {ns}:limits:{<ns>}:stats                  hash    "<kind>|<task>|<key>" -> deferrals
    {ns}:limits:{<ns>}:index                  zset    "<kind>|<task>|<key>" -> last use (ms)

Everything is bounded: rate keys expire once the bucket is full again, waiting
entries a minute after they were due, index entries (and their stats) a day
after their last use; a holder's lease lapses unless renewed.
"""

from __future__ import annotations

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

from runtime.errors import ConfigError, ResultStoreUnavailable
from runtime.ops.common import redis_errors

if TYPE_CHECKING:
    from runtime.app import Runtime

__all__ = ["ADMIT", "CONCURRENCY", "RATE", "SUPERSEDED", "Check", "LimitStore", "LimitsUnavailable",
           "MemoryLimitStore", "RedisLimitStore", "Snapshot", "store_for"]

#: Statuses of :meth:`LimitStore.admit`.
ADMIT, RATE, CONCURRENCY, SUPERSEDED = 0, 1, 2, 3
#: A deferred task's waiting entry is dropped this long after it was due.
_WAIT_KEEP_MS = 60_000
_MAX_CONNECTIONS = 16
#: An index entry (and its counter) is dropped this long after its last use.
_INDEX_KEEP_MS = 86_400_000


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
    #: limiter key of the concurrency limit (None: none)
    sem_key: str | None = None
    limit: int = 0
    lease_ms: int = 30_000
    retry_ms: int = 500
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

    async def release(self, task: str, sem_key: str, holder: str) -> None: ...
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
        self._tat: dict[tuple[str, str], float] = {}
        self._sem: dict[tuple[str, str], dict[str, float]] = {}
        self._wait: dict[str, dict[str, float]] = {}
        self._stats: dict[str, int] = {}
        self._index: dict[str, float] = {}
        self._strings: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._overrides: dict[str, dict[str, Any]] = {}

    def _defer(self, member: str, holder: str, now: float, delay: float) -> None:
        waiting = self._wait.setdefault(member, {})
        waiting[holder] = now + delay
        for h, due in list(waiting.items()):
            if due < now - _WAIT_KEEP_MS:
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
                self._defer(member, check.holder, now, check.retry_ms)
                return CONCURRENCY, check.retry_ms
            took = check.holder not in holders
            holders[check.holder] = now + check.lease_ms
            self._ran(member, check.holder, now)
        if check.rate_key is not None:
            member = _member("rate", check.task, check.rate_key)
            tat = max(self._tat.get((check.task, check.rate_key), now), now)
            allow_at = tat - (check.burst - 1) * check.interval_ms
            if now < allow_at:
                if took and check.sem_key is not None:
                    self._sem[(check.task, check.sem_key)].pop(check.holder, None)
                self._defer(member, check.holder, now, allow_at - now)
                return RATE, allow_at - now
            self._tat[(check.task, check.rate_key)] = tat + check.interval_ms
            self._ran(member, check.holder, now)
        return ADMIT, 0

    async def release(self, task: str, sem_key: str, holder: str) -> None:
        self._sem.get((task, sem_key), {}).pop(holder, None)

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
                          if due >= now - _WAIT_KEEP_MS)
            held = sum(1 for until in self._sem.get((task, key), {}).values() if until > now)
            out.append(Snapshot(kind=kind, task=task, key=key,
                                tat_ms=self._tat.get((task, key), 0.0) if kind == "rate" else 0.0,
                                held=held if kind == "concurrency" else 0, waiting=waiting,
                                deferred=self._stats.get(member, 0), now_ms=now))
        return out

    async def aclose(self) -> None:
        return None


# -- Redis -------------------------------------------------------------------------------------

_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

_DEFER = """
local function defer(wait, member, delay)
  redis.call('ZADD', wait, now + delay, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', wait, '-inf', now - WAIT_KEEP_MS)
  redis.call('PEXPIRE', wait, INDEX_KEEP_MS)
  redis.call('HINCRBY', KEYS[6], member, 1)
  redis.call('ZADD', KEYS[7], now, member)
end
local function ran(wait, member)
  redis.call('ZREM', wait, ARGV[2])
  redis.call('ZADD', KEYS[7], now, member)
end
""".replace("WAIT_KEEP_MS", str(_WAIT_KEEP_MS)).replace("INDEX_KEEP_MS", str(_INDEX_KEEP_MS))

# KEYS: 1 debounce, 2 sem, 3 sem wait, 4 rate, 5 rate wait, 6 stats, 7 index
# ARGV: 1 now ms ('' = Redis TIME), 2 holder, 3 concurrency limit (0: none), 4 lease ms,
#       5 interval ms (0: no rate), 6 burst, 7 sem member, 8 rate member, 9 retry ms,
#       10 debounce ('1' / '0')
# Returns {status, delay ms as text | latest id}
_ADMIT = _NOW + _DEFER + """
if ARGV[10] == '1' then
  local latest = redis.call('GET', KEYS[1])
  if latest and latest ~= ARGV[2] then return {3, latest} end
end
local took = false
local limit = tonumber(ARGV[3])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
    if redis.call('ZCARD', KEYS[2]) >= limit then
      defer(KEYS[3], ARGV[7], tonumber(ARGV[9]))
      return {2, ARGV[9]}
    end
    took = true
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) + 1000)
  ran(KEYS[3], ARGV[7])
end
local interval = tonumber(ARGV[5])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[4]) or now) or now
  if tat < now then tat = now end
  local allow_at = tat - (tonumber(ARGV[6]) - 1) * interval
  if now < allow_at then
    if took then redis.call('ZREM', KEYS[2], ARGV[2]) end
    defer(KEYS[5], ARGV[8], allow_at - now)
    return {1, tostring(allow_at - now)}
  end
  local new = tat + interval
  redis.call('SET', KEYS[4], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
  ran(KEYS[5], ARGV[8])
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - """ + str(_INDEX_KEEP_MS) + """)
return {0, '0'}
"""

# KEYS: sem zsets. ARGV: 1 now ('' = TIME), 2 lease ms, 3.. holders (one per key)
_RENEW = _NOW + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2]), ARGV[i + 2])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) + 1000)
end
return 0
"""

# KEYS: unique key. ARGV: 1 now (unused), 2 task id, 3 ttl ms
_UNIQUE = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
return redis.call('GET', KEYS[1])
"""

# KEYS: index, stats, then rate/sem/wait keys per member. ARGV: 1 now
_SNAPSHOT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - """ + str(_INDEX_KEEP_MS) + """)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {tostring(now)}
for _, m in ipairs(members) do
  local kind, rest = string.match(m, '^([^|]*)|(.*)$')
  local state = '0'
  if kind == 'rate' then
    state = redis.call('GET', ARGV[2] .. 'rate:' .. rest) or '0'
  else
    state = tostring(redis.call('ZCOUNT', ARGV[2] .. 'sem:' .. rest, '(' .. now, '+inf'))
  end
  local wait = ARGV[2] .. 'wait:' .. kind .. ':' .. rest
  local waiting = redis.call('ZCOUNT', wait, now - """ + str(_WAIT_KEEP_MS) + """, '+inf')
  local deferred = redis.call('HGET', KEYS[2], m) or '0'
  table.insert(out, m)
  table.insert(out, state)
  table.insert(out, tostring(waiting))
  table.insert(out, deferred)
end
return out
"""


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
        self._scripts: dict[str, Any] = {}

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
        with self._errors(doing):
            script = self._scripts.get(source)
            if script is None:
                script = self._scripts[source] = self._client().register_script(source)
            return await script(keys=list(keys), args=list(args))

    def _key(self, kind: str, task: str, key: str) -> str:
        return f"{self.base}{kind}:{task}|{key}"

    async def admit(self, check: Check, now_ms: float | None = None) -> tuple[int, Any]:
        task, sem, rate = check.task, check.sem_key or "", check.rate_key or ""
        keys = [self._key("debounce", task, check.debounce_key or ""),
                self._key("sem", task, sem), self._key("wait:concurrency", task, sem),
                self._key("rate", task, rate), self._key("wait:rate", task, rate),
                self.stats_key, self.index_key]
        args = ["" if now_ms is None else repr(float(now_ms)), check.holder,
                check.limit if check.sem_key is not None else 0, check.lease_ms,
                repr(check.interval_ms) if check.rate_key is not None else 0, check.burst,
                _member("concurrency", task, sem), _member("rate", task, rate), check.retry_ms,
                "1" if check.debounce_key is not None else "0"]
        status, value = await self._eval(_ADMIT, keys, args, f"check the limits of {task!r}")
        status = int(status)
        text = value.decode() if isinstance(value, bytes) else str(value)
        return (status, text) if status == SUPERSEDED else (status, float(text))

    async def release(self, task: str, sem_key: str, holder: str) -> None:
        with self._errors(f"release a concurrency permit of {task!r}"):
            await self._client().zrem(self._key("sem", task, sem_key), holder)

    async def renew(self, held: Sequence[tuple[str, str, str]], lease_ms: int,
                    now_ms: float | None = None) -> None:
        if not held:
            return
        keys = [self._key("sem", task, key) for task, key, _ in held]
        args = ["" if now_ms is None else repr(float(now_ms)), lease_ms,
                *(holder for _, _, holder in held)]
        await self._eval(_RENEW, keys, args, "renew concurrency permits")

    async def claim_unique(self, task: str, key: str, task_id: str, ttl_ms: int,
                           now_ms: float | None = None) -> str | None:
        found = await self._eval(_UNIQUE, [self._key("unique", task, key)],
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
        reply = await self._eval(_SNAPSHOT, [self.index_key, self.stats_key],
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
