"""Where schedules live: definitions, pauses, last runs, the leader lease and tick claims.

Two stores with one interface: ``RedisScheduleStore`` (shared by every process
of an app, on the result store's Redis) and ``MemoryScheduleStore`` (the
embedded default: one process only).

Redis keys, one hash tag per namespace so that the Lua scripts (which touch the
lease and a claim or a state in one call) stay in one Cluster slot
(``ns`` is the runtime's namespace, ``taskloom`` by default)::

    {ns}:sched:{<ns>}:defs        hash    name -> JSON ScheduleDef
    {ns}:sched:{<ns>}:paused      hash    name -> "1"   (kept apart: a code sync never touches it)
    {ns}:sched:{<ns>}:state       hash    name -> JSON ScheduleState (written by the leader only)
    {ns}:sched:{<ns>}:version     string  INCR on every change
    {ns}:sched:{<ns>}:changed     channel PUBLISHed with the new version on every change
    {ns}:sched:{<ns>}:lease       string  the leader's token "<fence>:<random>", PX lease
    {ns}:sched:{<ns>}:fence       string  INCR on every acquisition (the fencing counter)
    {ns}:sched:{<ns>}:tick:<name>:<tick ms>   string  per-tick claim, SET NX PX

A claim and the state write of a tick happen in one Lua call that first checks
that the lease still holds the caller's token: a leader that lost its lease
(paused, partitioned) claims nothing and publishes nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, suppress
from enum import IntEnum
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import anyio
import msgspec
import redis.asyncio as aioredis
import structlog

from runtime.errors import ConfigError, ResultStoreUnavailable, TaskloomError
from runtime.ops.common import redis_errors
from runtime.ops.scheduler.rules import Rule

__all__ = ["Claim", "MemoryScheduleStore", "Misfire", "RedisScheduleStore", "ScheduleDef",
           "ScheduleState", "ScheduleStore", "SchedulerUnavailable"]

log = structlog.get_logger("taskloom.scheduler")

Misfire = Literal["skip", "run_once", "run_all"]


class SchedulerUnavailable(ResultStoreUnavailable):
    """The schedule store (Redis) cannot be reached; the call can be retried."""


class ScheduleDef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a schedule publishes and when (``paused`` is stored apart)."""

    name: str
    task: str
    rule: Rule
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    misfire: Misfire = "skip"
    max_catchup: int = 100
    #: "code" (declared with the task, synced on start) or "api" (added at run time)
    source: str = "api"
    #: When it was first stored: no tick before it is ever missed.
    created_ms: int = 0


class ScheduleState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The last tick a leader handled (published, or skipped by the misfire policy)."""

    last_tick_ms: int | None = None
    last_run_ms: int | None = None
    last_task_id: str | None = None
    skipped: int = 0
    fence: int = 0


class Claim(IntEnum):
    CLAIMED = 1
    TAKEN = 0  # another leader (or an earlier call) claimed this tick
    NOT_LEADER = -1  # the lease is not ours any more


_ENC = msgspec.json.Encoder()
_DEF = msgspec.json.Decoder(ScheduleDef)
_STATE = msgspec.json.Decoder(ScheduleState)


class ScheduleStore(Protocol):
    """Schedules, their last runs, the leader lease and tick claims."""

    #: Whether processes other than this one can share it (elect one leader among them).
    shared: bool

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def load(self) -> tuple[int, dict[str, ScheduleDef], set[str]]:
        """(version, definitions by name, paused names)."""
        ...

    async def put(self, defn: ScheduleDef, *, keep_created: bool = True) -> None: ...
    async def remove(self, name: str) -> bool: ...
    async def set_paused(self, name: str, paused: bool) -> bool: ...
    async def states(self) -> dict[str, ScheduleState]: ...
    async def changed(self, version: int) -> None:
        """Return once the version is above ``version`` (a notification, not a poll)."""
        ...

    async def acquire(self, lease_ms: int) -> tuple[str, int] | None:
        """Take the lease if free: (token, fence), else None."""
        ...

    async def renew(self, token: str, lease_ms: int) -> bool: ...
    async def release(self, token: str) -> None: ...
    async def lease_ttl_ms(self) -> int: ...
    async def claim_tick(self, token: str, name: str, tick_ms: int, state: ScheduleState,
                         ttl_ms: int) -> Claim: ...
    async def set_state(self, token: str, name: str, state: ScheduleState) -> Claim: ...


# -- memory -----------------------------------------------------------------------------------


class MemoryScheduleStore:
    """The embedded default: everything in this process (one leader: this process)."""

    shared = False

    def __init__(self) -> None:
        self._defs: dict[str, ScheduleDef] = {}
        self._paused: set[str] = set()
        self._states: dict[str, ScheduleState] = {}
        self._claims: set[tuple[str, int]] = set()
        self._version = 0
        self._bumped = anyio.Event()
        self._lease: str | None = None
        self._fence = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def _bump(self) -> None:
        self._version += 1
        self._bumped.set()
        self._bumped = anyio.Event()

    async def load(self) -> tuple[int, dict[str, ScheduleDef], set[str]]:
        return self._version, dict(self._defs), set(self._paused)

    async def put(self, defn: ScheduleDef, *, keep_created: bool = True) -> None:
        old = self._defs.get(defn.name)
        if keep_created and old is not None:
            defn = msgspec.structs.replace(defn, created_ms=old.created_ms)
        self._defs[defn.name] = defn
        self._bump()

    async def remove(self, name: str) -> bool:
        found = self._defs.pop(name, None) is not None
        self._paused.discard(name)
        self._states.pop(name, None)
        self._bump()
        return found

    async def set_paused(self, name: str, paused: bool) -> bool:
        if name not in self._defs:
            return False
        (self._paused.add if paused else self._paused.discard)(name)
        self._bump()
        return True

    async def states(self) -> dict[str, ScheduleState]:
        return dict(self._states)

    async def changed(self, version: int) -> None:
        while self._version <= version:
            await self._bumped.wait()

    async def acquire(self, lease_ms: int) -> tuple[str, int] | None:
        if self._lease is not None:
            return None
        self._fence += 1
        self._lease = f"{self._fence}:{secrets.token_hex(8)}"
        return self._lease, self._fence

    async def renew(self, token: str, lease_ms: int) -> bool:
        return self._lease == token

    async def release(self, token: str) -> None:
        if self._lease == token:
            self._lease = None

    async def lease_ttl_ms(self) -> int:
        # a second scheduler in one process exists only while the first stops
        # (its release is a moment away): look again shortly
        return 0 if self._lease is None else 100

    async def claim_tick(self, token: str, name: str, tick_ms: int, state: ScheduleState,
                         ttl_ms: int) -> Claim:
        if self._lease != token:
            return Claim.NOT_LEADER
        if (name, tick_ms) in self._claims:
            return Claim.TAKEN
        self._claims.add((name, tick_ms))
        if len(self._claims) > 100_000:  # bounded: old claims are not needed once the state moved
            self._claims = {c for c in self._claims if c[1] >= tick_ms - ttl_ms}
        self._states[name] = state
        return Claim.CLAIMED

    async def set_state(self, token: str, name: str, state: ScheduleState) -> Claim:
        if self._lease != token:
            return Claim.NOT_LEADER
        self._states[name] = state
        return Claim.CLAIMED


# -- Redis ------------------------------------------------------------------------------------

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, claim, state hash. ARGV: token, claim ttl ms, name, state JSON
_CLAIM_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# KEYS: lease, state hash. ARGV: token, name, state JSON
_STATE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: defs, paused, state, version. ARGV: name, channel. Returns 1 if it existed.
_REMOVE_LUA = """
local found = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local v = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[2], v)
return found
"""

# KEYS: defs, paused, version. ARGV: name, paused (0/1), channel. Returns 0 if unknown.
_PAUSE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then redis.call('HSET', KEYS[2], ARGV[1], '1')
else redis.call('HDEL', KEYS[2], ARGV[1]) end
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], v)
return 1
"""

# KEYS: defs, version. ARGV: name, JSON, channel
_PUT_LUA = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], v)
return v
"""


class RedisScheduleStore:
    """Schedules on Redis, shared by every process of an app.

    ``async with`` opens a connection pool (nested entries share it); the
    listener for changes opens its own pub/sub connection while ``changed``
    is awaited.
    """

    shared = True

    def __init__(self, url: str, *, namespace: str = "") -> None:
        if "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace {namespace!r} must not contain '{{' or '}}': they "
                              "would break the Redis Cluster hash tags of the keys")
        self.url = url
        ns = namespace or "taskloom"
        base = f"{ns}:sched:{{{ns}}}"
        self._base = base
        self.defs_key, self.paused_key = f"{base}:defs", f"{base}:paused"
        self.state_key, self.version_key = f"{base}:state", f"{base}:version"
        self.channel, self.lease_key, self.fence_key = f"{base}:changed", f"{base}:lease", \
            f"{base}:fence"
        self._redis: aioredis.Redis | None = None
        self._entered = 0

    def tick_key(self, name: str, tick_ms: int) -> str:
        return f"{self._base}:tick:{name}:{tick_ms}"

    async def __aenter__(self) -> Self:
        if self._entered == 0:
            self._redis = aioredis.Redis.from_url(self.url, protocol=2, socket_timeout=10,
                                                  socket_connect_timeout=5)
            with self._errors("connect to the schedule store"):
                await self._redis.ping()
        self._entered += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._entered -= 1
        if self._entered == 0 and self._redis is not None:
            client, self._redis = self._redis, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise TaskloomError("the schedule store is not open: use `async with store:`")
        return self._redis

    def _errors(self, doing: str) -> AbstractContextManager[None]:
        return redis_errors(SchedulerUnavailable, self.url, doing)

    async def _eval(self, script: str, keys: list[str], args: list[Any], doing: str) -> Any:
        return await self._call(doing, "EVAL", script, len(keys), *keys, *args)

    async def _call(self, doing: str, *args: Any) -> Any:
        with self._errors(doing):
            return await self._client().execute_command(*args)  # type: ignore[no-untyped-call]

    async def load(self) -> tuple[int, dict[str, ScheduleDef], set[str]]:
        with self._errors("load the schedules"):
            pipe = self._client().pipeline(transaction=True)
            pipe.get(self.version_key)
            pipe.hgetall(self.defs_key)
            pipe.hkeys(self.paused_key)
            version, raw, paused = await pipe.execute()
        defs: dict[str, ScheduleDef] = {}
        for name, data in _hash_items(raw):
            try:
                defs[name] = _DEF.decode(data)
            except msgspec.DecodeError as e:
                log.error("a stored schedule cannot be read; remove or re-add it",
                          schedule=name, error=str(e))
        return int(version or 0), defs, {_text(p) for p in paused}

    async def put(self, defn: ScheduleDef, *, keep_created: bool = True) -> None:
        doing = f"store schedule {defn.name!r}"
        if keep_created:
            old = await self._call(doing, "HGET", self.defs_key, defn.name)
            if old is not None:
                with suppress(msgspec.DecodeError):  # unreadable: overwritten below
                    defn = msgspec.structs.replace(defn, created_ms=_DEF.decode(old).created_ms)
        await self._eval(_PUT_LUA, [self.defs_key, self.version_key],
                         [defn.name, _ENC.encode(defn), self.channel], doing)

    async def remove(self, name: str) -> bool:
        found = await self._eval(_REMOVE_LUA, [self.defs_key, self.paused_key, self.state_key,
                                               self.version_key], [name, self.channel],
                                 f"remove schedule {name!r}")
        return bool(found)

    async def set_paused(self, name: str, paused: bool) -> bool:
        found = await self._eval(_PAUSE_LUA, [self.defs_key, self.paused_key, self.version_key],
                                 [name, int(paused), self.channel],
                                 f"{'pause' if paused else 'resume'} schedule {name!r}")
        return bool(found)

    async def states(self) -> dict[str, ScheduleState]:
        raw = await self._call("read the schedules' last runs", "HGETALL", self.state_key)
        out = {}
        for name, data in _hash_items(raw):
            try:
                out[name] = _STATE.decode(data)
            except msgspec.DecodeError:
                log.warning("an unreadable schedule state is ignored", schedule=name)
        return out

    async def changed(self, version: int) -> None:
        """Subscribe, then compare the version (a change between the two is not
        missed), then wait for a message on the channel."""
        client = self._client()
        with self._errors("watch the schedules for changes"):
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(self.channel)
                if int(await client.get(self.version_key) or 0) > version:
                    return
                async for message in pubsub.listen():
                    if message.get("type") == "message" and int(message["data"]) > version:
                        return

    async def acquire(self, lease_ms: int) -> tuple[str, int] | None:
        doing = "take the scheduler lease"
        if await self._call(doing, "EXISTS", self.lease_key):
            return None
        fence = int(await self._call(doing, "INCR", self.fence_key))
        token = f"{fence}:{secrets.token_hex(8)}"
        if await self._call(doing, "SET", self.lease_key, token, "NX", "PX", lease_ms):
            return token, fence
        return None

    async def renew(self, token: str, lease_ms: int) -> bool:
        return bool(await self._eval(_RENEW_LUA, [self.lease_key], [token, lease_ms],
                                     "renew the scheduler lease"))

    async def release(self, token: str) -> None:
        await self._eval(_RELEASE_LUA, [self.lease_key], [token], "release the scheduler lease")

    async def lease_ttl_ms(self) -> int:
        return max(0, int(await self._call("read the scheduler lease", "PTTL", self.lease_key)))

    async def claim_tick(self, token: str, name: str, tick_ms: int, state: ScheduleState,
                         ttl_ms: int) -> Claim:
        reply = await self._eval(_CLAIM_LUA, [self.lease_key, self.tick_key(name, tick_ms),
                                              self.state_key],
                                 [token, max(1, ttl_ms), name, _ENC.encode(state)],
                                 f"claim a tick of schedule {name!r}")
        return Claim(int(reply))

    async def set_state(self, token: str, name: str, state: ScheduleState) -> Claim:
        reply = await self._eval(_STATE_LUA, [self.lease_key, self.state_key],
                                 [token, name, _ENC.encode(state)],
                                 f"record the last run of schedule {name!r}")
        return Claim(int(reply))

    async def purge(self) -> int:
        """Delete every scheduler key of this namespace (SCAN + UNLINK); for tests."""
        deleted, cursor = 0, 0
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self._base) + ":*"
        with self._errors("purge the schedule store"):
            while True:
                cursor, keys = await self._call("scan", "SCAN", cursor, "MATCH", pattern,
                                                "COUNT", 1000)
                if keys:
                    deleted += await self._call("unlink", "UNLINK", *keys)
                if int(cursor) == 0:
                    return deleted


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _hash_items(reply: Any) -> Iterator[tuple[str, bytes]]:
    """HGETALL as (field, value) pairs: redis-py gives a dict (RESP2 callback) or a list."""
    if isinstance(reply, dict):
        for k, v in reply.items():
            yield _text(k), v
    else:
        for i in range(0, len(reply or ()), 2):
            yield _text(reply[i]), reply[i + 1]
