"""The Redis Streams broker: consumer groups, late ack, leases, delays, priorities.

Layout (every key under the namespace prefix, hash-tagged per queue so that one
queue lives in one Redis Cluster slot)::

    <ns>:{<queue>}:p0 … :p9    one stream per priority level, group "taskloom"
    <ns>:{<queue>}:delayed     sorted set of delayed messages, score = due (ms, Redis clock)
    <ns>:{<queue>}:dead        dead-letter stream (fields e, r = reason, c = deliveries)

A stream entry is ``e`` (the msgpack-encoded :class:`~brokers.base.Envelope`)
plus ``n`` (deliveries before this entry, when it was requeued). The delivery
count is ``n`` + the entry's delivery counter in the group's pending list.

How the promises are kept:

* **Fetching** runs a Lua script that reads ``XREADGROUP … >`` from the priority
  streams, highest first, for at most the consumer's free prefetch credits (so
  the pending list of a consumer never exceeds its prefetch). When nothing is
  left it waits on ``XREAD BLOCK`` (a dedicated connection; it consumes nothing)
  for the next entry, then fetches again: leaving the idle state costs one extra
  round trip; a busy consumer never blocks. Under load a fetch waits for a
  quarter of the prefetch to be free, or ``batch_wait_s``.
* **Settling** (ack / nack / dead-letter) queues the settlement and returns; the
  consumer sends the queue's settlements as one script call per queue (``XACK`` +
  ``XDEL`` of all acked ids; requeues and dead-letters atomically with their
  ``XACK``), in the same round trip as its next fetch and settlements-first, or
  on its own within ``batch_wait_s`` under load (at once when idle). A crash in
  that window redelivers the message, as a crash before settling would.
  ``stats``, ``purge``, ``dead_letters`` and ``aclose`` flush first (read your
  own writes). Unacked entries are never trimmed.
* **Leases**: a consumer re-``XCLAIM``\\s (``JUSTID``) its unsettled entries every
  ``lease_s / 3`` seconds, and ``XAUTOCLAIM``\\s entries idle for ``lease_s``
  (those of dead consumers) every ``lease_s / 3``. Past ``max_deliveries`` an
  entry goes to the dead-letter stream with reason ``delivery_limit``.
* **Delays** live in the sorted set; a script moves due messages into the
  streams, scored on the Redis clock (never early). Each consumer sleeps until
  the earliest due time it knows of, at most ``delay_tick_s``: a delayed message
  published by someone else and due earlier is late by at most that tick.
* **Closing** stops fetching, flushes pending settlements, then puts every entry
  still pending for the consumer back at the end of its stream with its
  delivery count (one script per queue), and deletes the consumer.
* **Outages** (resets, blackholes, a restarted Redis): every error that means
  "the connection is not usable" (:func:`brokers.base.is_connection_failure`,
  uvloop's write on a closed transport included) is ``ConnectionLost``. A
  consumer rides out an outage of any length: it retries with doubling, capped
  (2 s), jittered pauses, keeps the settlements it could not send and sends them
  once Redis is back (each is gated by its ``XACK``, so a resend is harmless),
  then drops its stale pooled connections and takes up the entries pending for
  it that it never heard of (a fetch whose reply was lost). It logs one line
  when an outage starts and one when it ends. redis-py's own silent retry is off:
  a resent script might run twice.
* **Size**: an entry longer than ``max_message_bytes`` (plus 64 KiB of envelope)
  is dead-lettered inside Redis as ``too_large`` by the fetch script: its bytes
  never reach a worker. A consumer holds at most ``fetch_bytes`` of message
  bytes (at least one message): a fetch reads one entry first, then as many as
  the budget left fits at their average size.
* **Data loss**: when the group of a queue disappears (Redis restarted without
  persistence, keys deleted), the consumer logs an error, recreates the group at
  id 0 (never ``$``) and keeps serving.

Limits: a consumer of several queues issues multi-key commands across their hash
slots; on Redis Cluster give each consumer one queue. On Redis < 7.0 there is no
``XAUTOCLAIM`` deleted-id report (7.0 is required).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Annotated, Any, Final, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rex
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from brokers.base import (
    BrokerConnectionError,
    BrokerError,
    Capabilities,
    ConnectionFailed,
    ConnectionLost,
    DeadLetter,
    Envelope,
    PublishError,
    QueueStats,
    ReceiveIteration,
    SettleOnce,
    consumed_queues,
    is_connection_failure,
)
from brokers.base import (
    redact_url as _redact,
)

__all__ = ["RedisBroker", "RedisBrokerOptions", "RedisConsumer", "RedisDelivery"]

log = structlog.get_logger(__name__)

#: Priority levels 0..BANDS-1, one stream each.
BANDS: Final = 10
#: An entry may exceed ``max_message_bytes`` by this much: the envelope's id,
#: queue and headers around the body.
_ENVELOPE_HEADROOM: Final = 64 * 1024
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Envelope).decode


class RedisBrokerOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Options of :class:`RedisBroker`, given as query parameters of its URL:
    ``redis://host:6379/0?lease_s=60&max_deliveries=10``."""

    #: An entry whose consumer has not touched it for this long is reclaimed by
    #: another consumer (``XAUTOCLAIM`` min-idle). Live consumers heartbeat their
    #: deliveries every ``lease_s / 3``.
    lease_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    #: Deliveries after which a message goes to the dead-letter stream with reason
    #: ``delivery_limit`` (nacks, releases and reclaims all count); 0 = no limit.
    max_deliveries: Annotated[int, msgspec.Meta(ge=0)] = 5
    #: Longest single ``XREAD BLOCK`` of an idle consumer (wakes are push-driven).
    block_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    #: Longest sleep of the delayed-message timer (bounds lateness of delays
    #: published by other processes).
    delay_tick_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    #: First part of consumer names (``<name>-<pid>-<random>``); default the host name.
    consumer_name: str = ""
    #: Consumer group name.
    group: Annotated[str, msgspec.Meta(min_length=1)] = "taskloom"
    #: Messages per script call in ``publish_many``.
    publish_chunk: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: Under load, settlements and fetches wait up to this long (or until a quarter
    #: of the prefetch has accumulated) to share a round trip. A consumer that was
    #: idle for longer sends at once, so this adds no latency at low rates. 0 = never wait.
    batch_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.002
    #: Largest message body accepted (the runtime's ``max_message_bytes`` may not
    #: exceed it). A stream entry longer than this (plus 64 KiB for the envelope)
    #: is dead-lettered inside Redis as ``too_large``: its bytes never reach a worker.
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1)] = 16 * 1024 * 1024
    #: Bytes of message bodies one consumer fetches and holds at most (at least one
    #: message at a time): bounds a worker's memory whatever the entry sizes.
    fetch_bytes: Annotated[int, msgspec.Meta(ge=1)] = 8 * 1024 * 1024


# -- Lua ------------------------------------------------------------------------------

_PRELUDE = """
local function fields_of(f)
  local e, n = false, 0
  if not f then return e, n end
  for i = 1, #f, 2 do
    local k = f[i]
    if k == 'e' then e = f[i + 1] elseif k == 'n' then n = tonumber(f[i + 1]) or 0 end
  end
  return e, n
end
local function bury(dlq, f, reason, count)
  local args = {}
  if f then
    for i = 1, #f, 2 do
      local k = f[i]
      if k ~= 'n' and k ~= 'r' and k ~= 'c' then
        args[#args + 1] = k
        args[#args + 1] = f[i + 1]
      end
    end
  end
  args[#args + 1] = 'r'
  args[#args + 1] = reason
  args[#args + 1] = 'c'
  args[#args + 1] = tostring(count)
  redis.call('XADD', dlq, '*', unpack(args))
end
local function failed(r)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'NOGROUP', 1, true) then return 'nogroup' end
    error(r)
  end
  return false
end
local function now_ms(round)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + round(tonumber(t[2]) / 1000)
end
"""

# KEYS: per queue, in the order to serve them: its 10 priority streams, then its dead stream.
# ARGV: group, consumer, want, max deliveries, max entry bytes, byte budget.
# Entries longer than the max are dead-lettered here as 'too_large' (their bytes never
# leave Redis); the fetch stops once the entries found reach the byte budget.
# Returns {entries (flat: key index, id, envelope, delivery count), key indexes of band-0
# streams whose group was missing, ids dead-lettered at the limit, last id of every
# priority stream (only when fewer than `want` were found)}.
_FETCH = _PRELUDE + """
local group, consumer = ARGV[1], ARGV[2]
local want, maxd = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxb, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local bytes, taken = 0, 0
local per = 11
local nq = #KEYS / per
local out, lost, dead = {}, {}, {}
for band = 9, 0, -1 do
  for q = 0, nq - 1 do
    local ki = q * per + band + 1
    local key = KEYS[ki]
    if want > 0 and bytes < budget and (band == 0 or redis.call('EXISTS', key) == 1) then
      while want > 0 and bytes < budget do
        -- the first read of a fetch takes one entry; later reads as many as the
        -- budget left fits at the average size so far (entries are read whole)
        local asked = 1
        if taken > 0 then
          asked = math.min(want, math.max(1, math.floor((budget - bytes) * taken / bytes)))
        end
        local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked,
                              'STREAMS', key, '>')
        if failed(r) then
          redis.pcall('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
          if band == 0 then lost[#lost + 1] = ki end
          r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked,
                         'STREAMS', key, '>')
        end
        if not r then break end
        local entries = r[1][2]
        for _, entry in ipairs(entries) do
          local id, f = entry[1], entry[2]
          local e, n = fields_of(f)
          local count = n + 1
          local reason = false
          if not e then
            reason = 'malformed_entry'
          elseif string.len(e) > maxb then
            reason = 'too_large'
          elseif maxd > 0 and count > maxd then
            reason = 'delivery_limit'
          end
          if reason then
            bury(KEYS[q * per + per], f, reason, count)
            redis.call('XACK', key, group, id)
            redis.call('XDEL', key, id)
            dead[#dead + 1] = id
          else
            out[#out + 1] = ki
            out[#out + 1] = id
            out[#out + 1] = e
            out[#out + 1] = count
            want = want - 1
            taken = taken + 1
            bytes = bytes + string.len(e)
          end
        end
        if #entries < asked then break end
      end
    end
  end
end
local last = {}
if want > 0 and bytes < budget then
  for q = 0, nq - 1 do
    for band = 0, 9 do
      local r = redis.call('XREVRANGE', KEYS[q * per + band + 1], '+', '-', 'COUNT', 1)
      last[#last + 1] = r[1] and r[1][1] or '0-0'
    end
  end
end
return {out, lost, dead, last}
"""

# KEYS: 10 priority streams, delayed set, dead stream.
# ARGV: group, the acked ids joined by ',' (each prefixed with its band digit), then
# 5 per other settlement: verb ('n' nack, 'd' dead-letter), band, id, delivery count,
# delay ms (nack) or reason (dead-letter).
# Returns {settled, not pending any more, group missing}.
_SETTLE = _PRELUDE + """
local group = ARGV[1]
local acks = {}
local settled, missing, lost = 0, 0, 0
for a in string.gmatch(ARGV[2], '[^,]+') do
  local k = string.byte(a, 1) - 47
  local list = acks[k]
  if not list then
    list = {}
    acks[k] = list
  end
  list[#list + 1] = string.sub(a, 2)
end
for i = 3, #ARGV, 5 do
  local verb, band, id = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local key = KEYS[band + 1]
  local r = redis.pcall('XACK', key, group, id)
  if failed(r) then
    lost = lost + 1
  elseif r == 0 then
    missing = missing + 1
  else
    local count, arg = ARGV[i + 3], ARGV[i + 4]
    local entry = redis.call('XRANGE', key, id, id)[1]
    local f = entry and entry[2]
    local e = fields_of(f)
    if verb == 'n' and e then
      local delay = tonumber(arg)
      if delay > 0 then
        local due = now_ms(math.ceil) + delay
        redis.call('ZADD', KEYS[11], string.format('%.0f', due),
                   id .. '/' .. band .. '|' .. band .. count .. ':' .. e)
      else
        redis.call('XADD', key, '*', 'e', e, 'n', count)
      end
    else
      bury(KEYS[12], f, verb == 'n' and 'malformed_entry' or arg, count)
    end
    redis.call('XDEL', key, id)
    settled = settled + 1
  end
end
for k, list in pairs(acks) do
  local key = KEYS[k]
  for s = 1, #list, 1000 do
    local chunk = {unpack(list, s, math.min(s + 999, #list))}
    local r = redis.pcall('XACK', key, group, unpack(chunk))
    if failed(r) then
      lost = lost + #chunk
    else
      settled = settled + r
      missing = missing + #chunk - r
    end
    redis.call('XDEL', key, unpack(chunk))
  end
end
return {settled, missing, lost}
"""

# KEYS: 10 priority streams, delayed set.
# ARGV: number of plain messages (priority 0, no delay), those encoded envelopes,
# then 3 per other message: band, delay ms, encoded envelope (a delayed-set member
# when delayed).
_PUBLISH = _PRELUDE + """
local plain = tonumber(ARGV[1])
for i = 2, plain + 1 do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
local now = nil
for i = plain + 2, #ARGV, 3 do
  local delay = tonumber(ARGV[i + 1])
  if delay > 0 then
    now = now or now_ms(math.ceil)
    redis.call('ZADD', KEYS[11], string.format('%.0f', now + delay), ARGV[i + 2])
  else
    redis.call('XADD', KEYS[tonumber(ARGV[i]) + 1], '*', 'e', ARGV[i + 2])
  end
end
return #ARGV
"""

# KEYS: delayed set, 10 priority streams. ARGV: limit.
# Moves due messages (member: nonce '|' band count ':' envelope) into their streams.
# Returns {moved, ms until the next is due or -1, malformed members dropped}.
_PROMOTE = _PRELUDE + """
local now = now_ms(math.floor)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now),
                       'LIMIT', 0, tonumber(ARGV[1]))
local bad = 0
for _, m in ipairs(due) do
  local p = string.find(m, '|', 1, true)
  local c = p and string.find(m, ':', p + 2, true)
  local band = p and tonumber(string.sub(m, p + 1, p + 1))
  if c and band then
    redis.call('XADD', KEYS[band + 2], '*', 'e', string.sub(m, c + 1),
               'n', string.sub(m, p + 2, c - 1))
  else
    bad = bad + 1
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait, bad}
"""

# KEYS: 10 priority streams, dead stream.
# ARGV: group, consumer, min idle ms, want, max deliveries, stale consumer ms.
# Returns {entries (flat: key index, id, envelope, count), deleted (flat: key index, id),
# ids dead-lettered}.
_RECLAIM = _PRELUDE + """
local group, consumer, min_idle = ARGV[1], ARGV[2], ARGV[3]
local want, maxd, stale = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out, deleted, dead = {}, {}, {}
for band = 9, 0, -1 do
  local key = KEYS[band + 1]
  if redis.call('EXISTS', key) == 1 then
    local cursor = '0-0'
    for _ = 1, 100 do
      if want <= 0 then break end
      local r = redis.pcall('XAUTOCLAIM', key, group, consumer, min_idle, cursor, 'COUNT', want)
      if failed(r) then break end
      cursor = r[1]
      for _, entry in ipairs(r[2]) do
        local id, f = entry[1], entry[2]
        local p = redis.call('XPENDING', key, group, id, id, 1)
        local e, n = fields_of(f)
        local count = n + (p[1] and p[1][4] or 1)
        if not e or (maxd > 0 and count > maxd) then
          bury(KEYS[11], f, e and 'delivery_limit' or 'malformed_entry', count)
          redis.call('XACK', key, group, id)
          redis.call('XDEL', key, id)
          dead[#dead + 1] = id
        else
          out[#out + 1] = band + 1
          out[#out + 1] = id
          out[#out + 1] = e
          out[#out + 1] = count
          want = want - 1
        end
      end
      for _, id in ipairs(r[3] or {}) do
        deleted[#deleted + 1] = band + 1
        deleted[#deleted + 1] = id
      end
      if cursor == '0-0' then break end
    end
    local cs = redis.pcall('XINFO', 'CONSUMERS', key, group)
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        local info = {}
        for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
        if info['pending'] == 0 and info['name'] ~= consumer
           and tonumber(info['idle']) > stale then
          redis.call('XGROUP', 'DELCONSUMER', key, group, info['name'])
        end
      end
    end
  end
end
return {out, deleted, dead}
"""

# KEYS: 10 priority streams. ARGV: group, consumer, limit.
# The entries pending for the consumer (its own PEL), without touching them.
# Returns entries (flat: key index, id, envelope, delivery count).
_PENDING = _PRELUDE + """
local group, consumer, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for band = 9, 0, -1 do
  local key = KEYS[band + 1]
  if limit > 0 and redis.call('EXISTS', key) == 1 then
    local p = redis.pcall('XPENDING', key, group, '-', '+', limit, consumer)
    if not failed(p) then
      for _, item in ipairs(p) do
        local entry = redis.call('XRANGE', key, item[1], item[1])[1]
        local e, n = fields_of(entry and entry[2])
        if e then
          out[#out + 1] = band + 1
          out[#out + 1] = item[1]
          out[#out + 1] = e
          out[#out + 1] = n + item[4]
          limit = limit - 1
        end
      end
    end
  end
end
return out
"""

# KEYS: 10 priority streams, dead stream. ARGV: group, consumer.
# Puts every entry pending for the consumer back at the end of its stream, counting
# the delivery, then deletes the consumer. Returns how many were put back.
_RELEASE = _PRELUDE + """
local group, consumer = ARGV[1], ARGV[2]
local released = 0
for band = 0, 9 do
  local key = KEYS[band + 1]
  if redis.call('EXISTS', key) == 1 then
    while true do
      local p = redis.pcall('XPENDING', key, group, '-', '+', 100, consumer)
      if failed(p) or #p == 0 then break end
      for _, item in ipairs(p) do
        local id = item[1]
        local entry = redis.call('XRANGE', key, id, id)[1]
        redis.call('XACK', key, group, id)
        if entry then
          local e, n = fields_of(entry[2])
          if e then
            redis.call('XADD', key, '*', 'e', e, 'n', n + item[4])
            released = released + 1
          else
            bury(KEYS[11], entry[2], 'malformed_entry', n + item[4])
          end
          redis.call('XDEL', key, id)
        end
      end
    end
    redis.pcall('XGROUP', 'DELCONSUMER', key, group, consumer)
  end
end
return released
"""

# KEYS: 10 priority streams, delayed set, dead stream. ARGV: group.
# Returns {ready, delayed, in flight, dead}.
_STATS = """
local ready, inflight = 0, 0
for band = 0, 9 do
  local len = redis.call('XLEN', KEYS[band + 1])
  if len > 0 then
    local p = redis.pcall('XPENDING', KEYS[band + 1], ARGV[1])
    local pending = 0
    if type(p) == 'table' and not p.err then pending = p[1] end
    inflight = inflight + pending
    ready = ready + math.max(0, len - pending)
  end
end
return {ready, redis.call('ZCARD', KEYS[11]), inflight, redis.call('XLEN', KEYS[12])}
"""

# KEYS: 10 priority streams, delayed set. ARGV: group, limit.
# Deletes undelivered entries (after the group's last-delivered id) and delayed
# messages. Returns {removed, 1 when more may remain}.
_PURGE = """
local group, limit = ARGV[1], tonumber(ARGV[2])
local removed, more = 0, 0
for band = 0, 9 do
  local key = KEYS[band + 1]
  if redis.call('EXISTS', key) == 1 then
    local last = '0-0'
    local groups = redis.pcall('XINFO', 'GROUPS', key)
    if type(groups) == 'table' and not groups.err then
      for _, g in ipairs(groups) do
        local info = {}
        for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
        if info['name'] == group then last = info['last-delivered-id'] end
      end
    end
    local entries = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', limit)
    if #entries > 0 then
      local ids = {}
      for i, entry in ipairs(entries) do ids[i] = entry[1] end
      redis.call('XDEL', key, unpack(ids))
      removed = removed + #ids
      if #ids == limit then more = 1 end
    end
  end
end
removed = removed + redis.call('ZCARD', KEYS[11])
redis.call('DEL', KEYS[11])
return {removed, more}
"""


_Call = tuple["_Script", Sequence[str], Sequence[Any]]


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


FETCH, SETTLE, PUBLISH, PROMOTE, RECLAIM, RELEASE, STATS, PURGE, PENDING = (
    _Script(s) for s in (_FETCH, _SETTLE, _PUBLISH, _PROMOTE, _RECLAIM, _RELEASE, _STATS, _PURGE,
                         _PENDING)
)
_SCRIPTS = (FETCH, SETTLE, PUBLISH, PROMOTE, RECLAIM, RELEASE, STATS, PURGE, PENDING)


# -- errors ---------------------------------------------------------------------------

#: redis-py's own "the connection is not usable" types (see ``is_connection_failure``).
_CONNECTION_ERRORS: Final = (rex.ConnectionError, rex.TimeoutError)


@contextmanager
def _mapped(what: str, *, publish: bool = False) -> Iterator[None]:
    """Let errors leave only as ``brokers.base`` types. The one place that decides
    what a connection failure is: :func:`brokers.base.is_connection_failure`."""
    try:
        yield
    except BrokerError:
        raise
    except (rex.AuthenticationError, rex.AuthorizationError) as e:
        raise ConnectionFailed(f"{what}: Redis refused the credentials: {e}; "
                               "check the user and password in the broker URL") from e
    except rex.ResponseError as e:
        text = str(e)
        if text.startswith("OOM") or isinstance(e, rex.OutOfMemoryError):
            text += ("; Redis reached maxmemory: raise it, drain the queues, or purge "
                     "dead letters")
        cls = PublishError if publish else BrokerError
        raise cls(f"{what}: Redis replied with an error: {text}") from e
    except Exception as e:
        if is_connection_failure(e, _CONNECTION_ERRORS):
            raise ConnectionLost(f"{what}: lost the connection to Redis "
                                 f"({type(e).__name__}: {e}); the operation may be retried "
                                 "once Redis is reachable") from e
        if isinstance(e, rex.RedisError):
            raise BrokerError(f"{what}: {type(e).__name__}: {e}") from e
        raise


#: Reconnection backoff of a consumer: first and longest pause (seconds).
_BACKOFF_FIRST_S: Final = 0.05
_BACKOFF_MAX_S: Final = 2.0


def _backoff(failures: int) -> float:
    """The pause after ``failures`` failures in a row: doubling, capped, with
    jitter (so that the consumers of a fleet do not reconnect in lockstep)."""
    cap: float = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2.0 ** min(max(failures - 1, 0), 16))
    return cap * random.uniform(0.5, 1.0)


class _Outage:
    """One log line when a consumer loses Redis, one when it is back; the attempts
    in between go to the debug log."""

    __slots__ = ("consumer", "failures", "since")

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.since: float | None = None
        self.failures = 0

    def down(self, error: BrokerError) -> float:
        """Note a failure; how long to pause before the next attempt."""
        self.failures += 1
        if self.since is None:
            self.since = anyio.current_time()
            log.warning("lost the connection to Redis; reconnecting with backoff until it "
                        "is back (held deliveries keep running; their settlements are sent "
                        "once it is)", consumer=self.consumer, error=str(error))
        else:
            log.debug("Redis still unreachable", consumer=self.consumer, error=str(error),
                      failures=self.failures)
        return _backoff(self.failures)

    def up(self) -> bool:
        """Note a success; whether it ended an outage."""
        if self.since is None:
            return False
        log.warning("Redis is reachable again; resuming", consumer=self.consumer,
                    down_s=round(anyio.current_time() - self.since, 2),
                    failed_attempts=self.failures)
        self.since = None
        self.failures = 0
        return True


def _as_broker_error(what: str, error: Exception, *, publish: bool = False) -> BrokerError:
    """The ``brokers.base`` error for a Redis error reply returned in place."""
    try:
        with _mapped(what, publish=publish):
            raise error
    except BrokerError as e:
        return e
    return BrokerError(f"{what}: {error!r}")  # not a Redis error: still a broker error


async def _cmd(client: aioredis.Redis, *args: Any) -> Any:
    """A raw command (no redis-py argument massaging; typed for mypy)."""
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


# -- keys -----------------------------------------------------------------------------

class _Stream:
    """One priority stream of a queue."""

    __slots__ = ("band", "digit", "key", "queue")

    def __init__(self, queue: _Queue, band: int) -> None:
        self.queue = queue
        self.band = band
        self.digit = str(band).encode()
        self.key = queue.streams[band]


class _Queue:
    """The keys of one queue; they share the hash tag ``{queue}``."""

    __slots__ = ("bands", "dead", "delayed", "name", "streams")

    def __init__(self, prefix: str, name: str) -> None:
        if not name:
            raise ValueError("a queue name must not be empty")
        tag = f"{prefix}{{{name}}}"
        self.name = name
        self.streams = [f"{tag}:p{band}" for band in range(BANDS)]
        self.delayed = f"{tag}:delayed"
        self.dead = f"{tag}:dead"
        self.bands = [_Stream(self, band) for band in range(BANDS)]


def _band(priority: int) -> int:
    return 0 if priority <= 0 else min(priority, BANDS - 1)


# -- deliveries -----------------------------------------------------------------------

class RedisDelivery(SettleOnce):
    """A delivery of the Redis broker: one pending stream entry of its consumer."""

    __slots__ = ("_consumer", "_id", "_settled", "_size", "_stream", "delivery_count",
                 "envelope")

    def __init__(self, consumer: RedisConsumer, stream: _Stream, entry_id: bytes,
                 envelope: Envelope, delivery_count: int, size: int = 0) -> None:
        self._consumer = consumer
        self._stream = stream
        self._id = entry_id
        self._size = size
        self._settled: str | None = None
        self.envelope = envelope
        self.delivery_count = delivery_count

    # Settling queues the settlement for the consumer's next batch (sent within
    # ``batch_wait_s``, and always before its next fetch) and returns: a crash in
    # that window redelivers the message, as a crash before settling would.

    async def ack(self) -> None:
        if self._settle("ack"):
            self._consumer._submit(self, "a", "")

    async def nack(self, *, delay_s: float = 0.0) -> None:
        if self._settle("nack"):
            delay_ms = math.ceil(delay_s * 1000) if delay_s > 0 else 0
            self._consumer._submit(self, "n", str(delay_ms))

    async def dead_letter(self, reason: str) -> None:
        if self._settle("dead_letter"):
            self._consumer._submit(self, "d", reason)

    async def extend(self) -> None:
        """Renew the lease now (the consumer also does it every ``lease_s / 3``)."""
        if self._settled is None:
            await self._consumer._extend(self)

    def __repr__(self) -> str:
        return (f"RedisDelivery(id={self.envelope.id!r}, queue={self._stream.queue.name!r}, "
                f"entry={self._id.decode()!r}, delivery_count={self.delivery_count})")


class _Batch:
    """Settlements waiting for one flush: per queue, acked ids (prefixed with
    their band digit) and other settlements (5 script arguments each)."""

    __slots__ = ("delays", "full", "ops", "retried", "size")

    def __init__(self) -> None:
        self.size = 0
        self.full = anyio.Event()
        self.ops: dict[_Queue, tuple[list[bytes], list[str | bytes | int]]] = {}
        self.delays = False
        self.retried = False  # holds settlements whose first send may have been applied

    def merge(self, other: _Batch) -> None:
        """Take ``other``'s settlements (a batch that could not be sent)."""
        for q, (acks, rest) in other.ops.items():
            ops = self.ops.get(q)
            if ops is None:
                ops = self.ops[q] = ([], [])
            ops[0].extend(acks)
            ops[1].extend(rest)
        self.size += other.size
        self.delays = self.delays or other.delays
        self.retried = True

    def ids(self) -> set[bytes]:
        """The entry ids this batch settles."""
        out: set[bytes] = set()
        for acks, rest in self.ops.values():
            out.update(a[1:] for a in acks)
            out.update(i for i in rest[2::5] if isinstance(i, bytes))
        return out

    def calls(self, group: str) -> list[_Call]:
        return [(SETTLE, [*q.streams, q.delayed, q.dead], [group, b",".join(acks), *other])
                for q, (acks, other) in self.ops.items()]


# -- consumer -------------------------------------------------------------------------

class RedisConsumer(ReceiveIteration):
    """A consumer of the Redis broker; see :meth:`RedisBroker.consume`."""

    def __init__(self, broker: RedisBroker, queues: Sequence[str], prefetch: int) -> None:
        self._broker = broker
        self._opts = broker.options
        self._queues = [broker._queue(name) for name in consumed_queues(queues, prefetch)]
        self._prefetch = prefetch
        self._low_water = max(1, prefetch // 4)
        self.name = broker._consumer_name()
        self._ready: deque[RedisDelivery] = deque()
        self._unsettled: set[RedisDelivery] = set()
        self._reserved = 0  # credits of fetches in progress
        self._last_fetch = self._last_flush = -math.inf  # when the last round trip began
        self._closed = False
        self._closed_event = anyio.Event()
        self._started = False
        self._has_ready = anyio.Event()
        self._credit = anyio.Event()
        self._batch = _Batch()
        self._flush_wake = anyio.Event()
        self._flush_lock = anyio.Lock()
        self._delay_wake = anyio.Event()
        self._intake_scope = anyio.CancelScope()
        self._intake_stopped = anyio.Event()
        self._scope = anyio.CancelScope()
        self._rotation = 0
        # (keys, key index -> stream) for each rotation of the queue order (fairness)
        self._layouts: list[tuple[list[str], list[_Stream | None]]] = []
        for r in range(len(self._queues)):
            keys: list[str] = []
            slots: list[_Stream | None] = []
            for q in self._queues[r:] + self._queues[:r]:
                keys += [*q.streams, q.dead]
                slots += [*q.bands, None]
            self._layouts.append((keys, slots))
        self._blocking: aioredis.Redis | None = None
        self._outage = _Outage(self.name)
        self._held_bytes = 0  # message bytes of unsettled deliveries (see fetch_bytes)
        self._reread_pel = False  # after an outage: look for entries we never heard of

    # -- the receive stream ------------------------------------------------------------

    async def receive(self) -> RedisDelivery:
        while True:
            if self._closed:
                raise anyio.EndOfStream
            if self._ready:
                delivery = self._ready.popleft()
                if not self._ready:
                    self._credit.set()
                return delivery
            if self._has_ready.is_set():
                self._has_ready = anyio.Event()
            await self._has_ready.wait()

    async def aclose(self) -> None:
        """Stop fetching, flush settlements, hand unsettled deliveries back."""
        if self._closed:
            with anyio.CancelScope(shield=True):
                await self._closed_event.wait()
            return
        self._closed = True
        self._has_ready.set()
        with anyio.CancelScope(shield=True):
            self._intake_scope.cancel()
            if self._started:
                await self._intake_stopped.wait()
            # from here on, settling what is still unsettled is a no-op; what was
            # settled before is flushed before the rest is handed back
            held = len(self._unsettled)
            for delivery in self._unsettled:
                delivery._settled = "released"
            self._unsettled.clear()
            self._held_bytes = 0
            self._ready.clear()
            await self.flush()
            try:
                with _mapped("releasing unsettled deliveries"):
                    released = 0
                    for q in self._queues:
                        released += int(await self._broker._eval(
                            RELEASE, [*q.streams, q.dead], [self._opts.group, self.name]))
                if released:
                    log.info("handed unsettled deliveries back", consumer=self.name,
                             released=released)
            except BrokerError as e:
                log.warning("could not hand unsettled deliveries back; other consumers "
                            "will reclaim them once their lease expires", consumer=self.name,
                            held=held, lease_s=self._opts.lease_s, error=str(e))
            self._scope.cancel()
            self._broker._consumers.discard(self)
            if self._blocking is not None:
                await self._blocking.aclose()
            self._closed_event.set()

    # -- background --------------------------------------------------------------------

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        opts = self._opts
        self._blocking = self._broker._client(socket_timeout=opts.block_s + 5.0)
        with self._scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._flush_loop)
                tg.start_soon(self._intake)
                self._started = True
                task_status.started()

    async def _intake(self) -> None:
        try:
            with self._intake_scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._fetch_loop)
                    tg.start_soon(self._lease_loop)
                    tg.start_soon(self._delay_loop)
        finally:
            self._intake_stopped.set()

    def _want(self) -> tuple[int, float]:
        """How many to fetch now (0: not now), and until when to wait otherwise."""
        free = self._prefetch - len(self._unsettled) - self._reserved
        if self._held_bytes >= self._opts.fetch_bytes and self._unsettled:
            return 0, math.inf  # holding its byte budget: wait for settlements
        if free >= self._low_water:
            return free, math.inf
        if free <= 0 or self._ready:
            return 0, math.inf
        due = self._last_fetch + self._opts.batch_wait_s
        if anyio.current_time() >= due:
            return free, math.inf
        return 0, due  # busy: let credits accumulate for a moment

    async def _fetch_loop(self) -> None:
        while True:
            want, until = self._want()
            if want == 0:
                self._credit = anyio.Event()
                with anyio.move_on_after(until - anyio.current_time()):
                    await self._credit.wait()
                continue
            try:
                self._reserved += want
                try:
                    with anyio.CancelScope(shield=True):
                        async with self._flush_lock:
                            if self._reread_pel:
                                await self._recover_pending()
                            streams = await self._fetch(want)
                finally:
                    self._reserved -= want
                if self._outage.up():
                    await self._drop_stale_connections()
                if streams:
                    with _mapped("waiting for messages"):
                        assert self._blocking is not None
                        await self._blocking.xread(streams, count=1,
                                                   block=int(self._opts.block_s * 1000))
            except BrokerConnectionError as e:
                self._reread_pel = True
                await anyio.sleep(self._outage.down(e))
            except BrokerError as e:
                log.warning("fetching from Redis failed; retrying", consumer=self.name,
                            error=str(e))
                await anyio.sleep(_backoff(4))

    async def _drop_stale_connections(self) -> None:
        """After an outage: close the idle pooled connections. The outage broke
        them, and a client finds out only by failing on one (uvloop: a write on
        a closed transport), which would look like a new outage."""
        with anyio.CancelScope(shield=True):
            await self._broker._redis_client.connection_pool.disconnect(
                inuse_connections=False)
            if self._blocking is not None:
                await self._blocking.connection_pool.disconnect()

    async def _recover_pending(self) -> None:
        """After an outage: take up the entries pending for this consumer that it
        does not know of (a fetch whose reply the outage swallowed), instead of
        leaving them to a reclaim after ``lease_s``. Call with the flush lock held."""
        known = {d._id for d in self._unsettled} | self._batch.ids()
        found = 0
        for q in self._queues:
            with _mapped("re-reading this consumer's pending entries"):
                out = await self._broker._eval(
                    PENDING, q.streams, [self._opts.group, self.name, self._prefetch])
            mine = []
            for i in range(0, len(out), 4):
                if out[i + 1] not in known:
                    mine += out[i:i + 4]
            if mine:
                found += len(mine) // 4
                self._accept(mine, q.bands)
        self._reread_pel = False
        if found:
            log.info("took up deliveries whose fetch reply was lost in the outage",
                     consumer=self.name, count=found)

    async def _fetch(self, want: int) -> dict[Any, Any]:
        """Flush pending settlements and fetch up to ``want`` deliveries, in one
        round trip (settlements first: a requeued message competes for the fetch).
        When fewer were found, returns the priority streams with their last ids,
        for ``XREAD BLOCK`` to wait on."""
        keys, slots = self._layouts[self._rotation]
        self._rotation = (self._rotation + 1) % len(self._layouts)
        opts = self._opts
        self._last_fetch = anyio.current_time()
        batch = self._take_batch()
        calls = batch.calls(opts.group) if batch is not None else []
        budget = max(1, opts.fetch_bytes - self._held_bytes)
        calls.append((FETCH, keys, [opts.group, self.name, want, opts.max_deliveries,
                                    opts.max_message_bytes + _ENVELOPE_HEADROOM, budget]))
        try:
            with _mapped("fetching messages"):
                results = await self._broker._eval_many(calls)
        except BrokerError as e:
            if batch is not None:
                self._settled(batch, e, [])
            raise
        if batch is not None:
            self._settled(batch, None, results[:-1])
        fetched = results[-1]
        if isinstance(fetched, Exception):
            raise _as_broker_error("fetching messages", fetched)
        out, lost, dead, last = fetched
        if out:
            self._accept(out, slots)
        for ki in lost:
            stream = slots[ki - 1]
            assert stream is not None
            log.error("DATA LOSS: the consumer group of a queue was missing (Redis restarted "
                      "without persistence, or its keys were deleted); recreated it at id 0. "
                      "Messages published before the loss are gone.",
                      queue=stream.queue.name, stream=stream.key, group=opts.group)
        if dead:
            log.warning("dead-lettered messages past max_deliveries, too large or malformed",
                        count=len(dead), max_deliveries=opts.max_deliveries,
                        max_message_bytes=opts.max_message_bytes)
        if not last:
            return {}
        per = BANDS + 1
        return {keys[j * per + b]: last[j * BANDS + b]
                for j in range(len(self._queues)) for b in range(BANDS)}

    def _accept(self, out: list[Any], slots: Sequence[_Stream | None]) -> None:
        ready, unsettled = self._ready, self._unsettled
        for i in range(0, len(out), 4):
            stream = slots[out[i] - 1]
            assert stream is not None
            entry_id, data, count = out[i + 1], out[i + 2], out[i + 3]
            try:
                envelope = _decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("dead-lettering a stream entry that is not a taskloom envelope",
                          queue=stream.queue.name, entry=entry_id.decode())
                bad = RedisDelivery(self, stream, entry_id, Envelope(
                    id=entry_id.decode(), queue=stream.queue.name, body=data), count)
                bad._settled = "dead_letter"
                self._submit(bad, "d", "malformed_entry")
                continue
            delivery = RedisDelivery(self, stream, entry_id, envelope, count, len(data))
            self._held_bytes += len(data)
            unsettled.add(delivery)
            ready.append(delivery)
        self._has_ready.set()

    async def _lease_loop(self) -> None:
        period = self._opts.lease_s / 3
        while True:
            try:
                await self._heartbeat()
                with anyio.CancelScope(shield=True):
                    await self._reclaim()
            except BrokerConnectionError as e:
                self._reread_pel = True
                await anyio.sleep(min(period, self._outage.down(e)))
                continue
            except BrokerError as e:
                log.warning("lease upkeep failed; retrying", consumer=self.name, error=str(e))
            await anyio.sleep(period)

    async def _heartbeat(self) -> None:
        """Re-claim our unsettled entries so that nobody reclaims them."""
        by_stream: dict[_Stream, list[Any]] = {}
        for delivery in self._unsettled:
            by_stream.setdefault(delivery._stream, []).append(delivery._id)
        if not by_stream:
            return
        group = self._opts.group
        with _mapped("renewing leases"):
            pipe = self._broker._redis_client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                for i in range(0, len(ids), 1000):
                    pipe.xclaim(stream.key, group, self.name, 0, ids[i:i + 1000], justid=True)
            results = await pipe.execute(raise_on_error=False)
        kept = sum(len(r) for r in results if isinstance(r, list))
        held = sum(len(ids) for ids in by_stream.values())
        if kept < held:
            log.warning("lost the lease of some deliveries (settled or reclaimed elsewhere, "
                        "or Redis lost them); they may run twice", consumer=self.name,
                        lost=held - kept)

    async def _reclaim(self) -> None:
        """XAUTOCLAIM entries idle longer than the lease (their consumer died)."""
        opts = self._opts
        lease_ms = int(opts.lease_s * 1000)
        stale_ms = max(lease_ms * 10, 60_000)
        for q in self._queues:
            want = self._prefetch - len(self._unsettled) - self._reserved
            if want <= 0:
                return
            with _mapped("reclaiming stale deliveries"):
                out, deleted, dead = await self._broker._eval(
                    RECLAIM, [*q.streams, q.dead],
                    [opts.group, self.name, lease_ms, want, opts.max_deliveries, stale_ms])
            if out:
                log.warning("reclaimed deliveries of a consumer that stopped renewing its "
                            "lease", consumer=self.name, queue=q.name, count=len(out) // 4)
                self._accept(out, q.bands)
            if deleted:
                log.error("DATA LOSS: pending entries whose messages were deleted from the "
                          "stream (trimmed or XDEL'd while unacked)", queue=q.name,
                          entries=[e.decode() for e in deleted[1::2]])
            if dead:
                log.warning("dead-lettered reclaimed messages past max_deliveries",
                            queue=q.name, count=len(dead), max_deliveries=opts.max_deliveries)

    async def _delay_loop(self) -> None:
        tick = self._opts.delay_tick_s
        while True:
            self._delay_wake = anyio.Event()
            wait = tick
            try:
                for q in self._queues:
                    while True:
                        with _mapped("moving due delayed messages"):
                            moved, due_ms, bad = await self._broker._eval(
                                PROMOTE, [q.delayed, *q.streams], [1000])
                        if bad:
                            log.error("dropped malformed delayed-set members", queue=q.name,
                                      count=bad)
                        if moved < 1000:
                            break
                    if due_ms >= 0:
                        wait = min(wait, due_ms / 1000 + 0.001)
            except BrokerConnectionError as e:
                wait = max(wait, self._outage.down(e))
            except BrokerError as e:
                log.warning("moving delayed messages failed; retrying", error=str(e))
            with anyio.move_on_after(max(wait, 0.001)):
                await self._delay_wake.wait()

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wake.wait()
            self._flush_wake = anyio.Event()
            batch = self._batch
            wait = self._last_flush + self._opts.batch_wait_s - anyio.current_time()
            if wait > 0:
                # busy: let more settlements (or the next fetch) join this batch
                with anyio.move_on_after(wait):
                    await batch.full.wait()
            else:
                await anyio.lowlevel.checkpoint()  # let tasks ready to settle join
            async with self._flush_lock:
                lost = await self._flush()
            if lost is not None:
                # Redis is unreachable: the settlements were put back; try again later
                await anyio.sleep(self._outage.down(lost))
                self._flush_wake.set()

    # -- settling ----------------------------------------------------------------------

    def _submit(self, delivery: RedisDelivery, verb: str, arg: str) -> None:
        if delivery in self._unsettled:
            self._unsettled.remove(delivery)
            self._held_bytes -= delivery._size
        self._credit.set()
        batch = self._batch
        batch.size += 1
        if batch.size == self._low_water:
            batch.full.set()
        stream = delivery._stream
        ops = batch.ops.get(stream.queue)
        if ops is None:
            ops = batch.ops[stream.queue] = ([], [])
        if verb == "a":
            ops[0].append(stream.digit + delivery._id)
        else:
            ops[1].extend((verb, stream.band, delivery._id, delivery.delivery_count, arg))
            if verb == "n" and arg != "0":
                batch.delays = True
        self._flush_wake.set()

    def _take_batch(self) -> _Batch | None:
        batch = self._batch
        if not batch.ops:
            return None
        self._batch = _Batch()
        self._last_flush = anyio.current_time()
        return batch

    async def flush(self) -> None:
        """Send pending settlements now (``aclose`` and the broker's ``stats``,
        ``purge`` and ``dead_letters`` do it first)."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> BrokerConnectionError | None:
        """Send pending settlements (call with the flush lock held); the error when
        Redis was unreachable (they were put back for the next try)."""
        batch = self._take_batch()
        if batch is None:
            return None
        try:
            with anyio.CancelScope(shield=True), _mapped("settling deliveries"):
                results = await self._broker._eval_many(batch.calls(self._opts.group))
        except BrokerError as e:
            self._settled(batch, e, [])
            if isinstance(e, BrokerConnectionError) and not self._closed:
                return e
            return None
        self._settled(batch, None, results)
        return None

    def _settled(self, batch: _Batch, error: BrokerError | None, results: list[Any]) -> None:
        if isinstance(error, BrokerConnectionError) and not self._closed:
            # The settle script is idempotent (each settlement is gated by its XACK):
            # send these again with the next batch once Redis is back.
            self._batch.merge(batch)
            return
        for result in results:
            if isinstance(result, Exception):
                error = _as_broker_error("settling deliveries", result)
        if error is not None:
            log.warning("could not settle deliveries; they will be redelivered",
                        consumer=self.name, count=batch.size, error=str(error))
        else:
            missing = sum(r[1] for r in results)
            lost = sum(r[2] for r in results)
            if missing and batch.retried:
                log.info("settlements sent again after a lost connection had been applied "
                         "already", consumer=self.name, count=missing)
            elif missing:
                log.warning("settled deliveries that were no longer pending: settled by "
                            "another consumer after a reclaim (they ran twice), or lost by "
                            "Redis", consumer=self.name, count=missing)
            if lost:
                log.error("DATA LOSS: settled deliveries whose consumer group is gone "
                          "(Redis restarted without persistence?)", count=lost)
        if batch.delays:
            self._delay_wake.set()

    async def _extend(self, delivery: RedisDelivery) -> None:
        with _mapped("renewing a lease"):
            kept = await self._broker._redis_client.xclaim(
                delivery._stream.key, self._opts.group, self.name, 0, [delivery._id],
                justid=True)
        if not kept:
            log.warning("lost the lease of a delivery (reclaimed or settled elsewhere)",
                        message_id=delivery.envelope.id)


# -- broker ---------------------------------------------------------------------------

class RedisBroker:
    """Redis Streams broker. ``RedisBroker.from_url("redis://localhost:6379/0")``."""

    def __init__(self, url: str = "redis://localhost:6379/0", *, namespace: str = "",
                 options: RedisBrokerOptions | None = None) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace {namespace!r} must not contain '{{' or '}}': they "
                             "would break the per-queue Redis Cluster hash tags")
        self.url = url
        self.namespace = namespace
        self.options = options or RedisBrokerOptions()
        self.capabilities = Capabilities(max_priority=BANDS - 1, native_delay=True,
                                         max_message_bytes=self.options.max_message_bytes,
                                         lease_s=self.options.lease_s)
        self._prefix = f"{namespace}:" if namespace else "taskloom:"
        self._queues: dict[str, _Queue] = {}
        self._consumers: set[RedisConsumer] = set()
        self._redis: aioredis.Redis | None = None

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "") -> RedisBroker:
        """``redis://``, ``rediss://`` or ``unix://`` URL; query parameters named
        like :class:`RedisBrokerOptions` fields configure the broker, the others
        go to redis-py."""
        parts = urlsplit(url)
        known = set(RedisBrokerOptions.__struct_fields__)
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in known:
                ours[key] = value
            else:
                theirs.append((key, value))
        try:
            options = msgspec.convert(ours, RedisBrokerOptions, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid Redis broker option in {_redact(url)}: {e}; "
                             f"known options: {', '.join(sorted(known))}") from None
        return cls(urlunsplit(parts._replace(query=urlencode(theirs))),
                   namespace=namespace, options=options)

    # -- connection --------------------------------------------------------------------

    def _client(self, **overrides: Any) -> aioredis.Redis:
        kwargs: dict[str, Any] = {
            # No silent retry inside redis-py: a script whose reply timed out may
            # have run (a fetch that filled the pending list, a settlement); the
            # consumer's own recovery knows how to check, a blind resend does not.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=0),
            "socket_connect_timeout": 5.0,
            "socket_timeout": 10.0,
            **overrides,
        }
        try:
            return aioredis.Redis.from_url(self.url, **kwargs)
        except ValueError as e:
            raise ValueError(f"invalid Redis URL {_redact(self.url)}: {e}") from None

    @property
    def _redis_client(self) -> aioredis.Redis:
        if self._redis is None:
            raise BrokerError("the Redis broker is not connected: use `async with broker:`")
        return self._redis

    async def __aenter__(self) -> Self:
        if self._redis is not None:
            return self
        client = self._client()
        try:
            await client.ping()
            pipe = client.pipeline(transaction=False)
            for script in _SCRIPTS:
                pipe.execute_command("SCRIPT", "LOAD", script.source)
            await pipe.execute()
        except Exception as e:
            if not (isinstance(e, rex.RedisError) or is_connection_failure(e)):
                raise
            await client.aclose()
            raise ConnectionFailed(
                f"could not connect to Redis at {_redact(self.url)}: {e}; check the URL "
                "and that redis-server is running and reachable") from e
        self._redis = client
        await self._check_eviction()
        return self

    async def _check_eviction(self) -> None:
        try:
            policy = (await self._redis_client.config_get("maxmemory-policy")).get(
                "maxmemory-policy")
        except rex.RedisError:
            return  # CONFIG may be denied by ACLs; not fatal
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy and policy != "noeviction":
            log.error("Redis maxmemory-policy is not noeviction: Redis may evict queued "
                      "messages under memory pressure; set maxmemory-policy noeviction",
                      policy=policy)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for consumer in list(self._consumers):
            await consumer.aclose()
        if self._redis is not None:
            client, self._redis = self._redis, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(self._prefix, name)
        return q

    def _consumer_name(self) -> str:
        host = self.options.consumer_name or socket.gethostname()
        return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        r = self._redis_client
        try:
            return await _cmd(r, "EVALSHA", script.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            await _cmd(r, "SCRIPT", "LOAD", script.source)
            return await _cmd(r, "EVALSHA", script.sha, len(keys), *keys, *args)

    async def _eval_many(self, calls: Sequence[_Call]) -> list[Any]:
        """Run script calls in one round trip; each runs atomically, the batch does
        not. Error replies come back in place as exceptions; connection errors raise."""
        if len(calls) == 1:
            script, keys, args = calls[0]
            try:
                return [await self._eval(script, keys, args)]
            except rex.ResponseError as e:
                return [e]
        pipe = self._redis_client.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for i, result in enumerate(results):
            if isinstance(result, rex.NoScriptError):
                script, keys, args = calls[i]
                try:
                    results[i] = await self._eval(script, keys, args)
                except rex.ResponseError as e:
                    results[i] = e
        return results

    # -- the protocol ------------------------------------------------------------------

    async def declare(self, queue: str) -> None:
        q = self._queue(queue)
        with _mapped(f"declaring queue {queue!r}"):
            try:
                await _cmd(self._redis_client, "XGROUP", "CREATE", q.streams[0],
                           self.options.group, "0", "MKSTREAM")
            except rex.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def publish(self, envelope: Envelope) -> None:
        q = self._queue(envelope.queue)
        band = _band(envelope.priority)
        with _mapped(f"publishing message {envelope.id} to queue {envelope.queue!r}",
                     publish=True):
            if envelope.delay_s > 0:
                await self._eval(PUBLISH, [*q.streams, q.delayed],
                                 [0, band, math.ceil(envelope.delay_s * 1000),
                                  self._delayed_member(envelope, band)])
                self._wake_delay_timers()
            else:
                await _cmd(self._redis_client, "XADD", q.streams[band], "*", "e",
                           _encode(envelope))

    @staticmethod
    def _delayed_member(envelope: Envelope, band: int) -> bytes:
        return b"%s|%d0:%s" % (secrets.token_hex(8).encode(), band, _encode(envelope))

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """One pipeline of script calls (``publish_chunk`` messages each, one queue
        per call). All or error: when it raises, any subset may be stored."""
        chunk = self.options.publish_chunk
        groups: dict[str, tuple[list[bytes], list[bytes | int]]] = {}
        calls: list[tuple[_Script, Sequence[str], Sequence[Any]]] = []

        def flush(name: str, plain: list[bytes], other: list[bytes | int]) -> None:
            q = self._queue(name)
            calls.append((PUBLISH, [*q.streams, q.delayed], [len(plain), *plain, *other]))

        for env in envelopes:
            entry = groups.get(env.queue)
            if entry is None:
                entry = groups[env.queue] = ([], [])
            plain, other = entry
            if env.delay_s > 0:
                band = _band(env.priority)
                other += (band, math.ceil(env.delay_s * 1000), self._delayed_member(env, band))
            elif env.priority > 0:
                other += (_band(env.priority), 0, _encode(env))
            else:
                plain.append(_encode(env))
            if len(plain) + len(other) // 3 >= chunk:
                flush(env.queue, plain, other)
                groups[env.queue] = ([], [])
        for name, (plain, other) in groups.items():
            if plain or other:
                flush(name, plain, other)
        if not calls:
            return
        what = f"publishing {len(envelopes)} messages"
        with _mapped(what, publish=True):
            results = await self._eval_many(calls)
        for result in results:
            if isinstance(result, Exception):
                raise _as_broker_error(what, result, publish=True)
        if any(env.delay_s > 0 for env in envelopes):
            self._wake_delay_timers()

    def _wake_delay_timers(self) -> None:
        """Delays published through this broker need not wait for the tick."""
        for consumer in self._consumers:
            consumer._delay_wake.set()

    @asynccontextmanager
    async def consume(
        self, queues: Sequence[str], *, prefetch: int
    ) -> AsyncIterator[RedisConsumer]:
        consumer = RedisConsumer(self, queues, prefetch)
        for q in consumer._queues:
            await self.declare(q.name)
        async with anyio.create_task_group() as tg:
            await tg.start(consumer._run)
            self._consumers.add(consumer)
            try:
                yield consumer
            finally:
                await consumer.aclose()

    async def _flush_consumers(self) -> None:
        """Read your own writes: send this broker's queued settlements first."""
        for consumer in list(self._consumers):
            await consumer.flush()

    async def stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        await self._flush_consumers()
        with _mapped(f"reading the stats of queue {queue!r}"):
            ready, delayed, in_flight, dead = await self._eval(
                STATS, [*q.streams, q.delayed, q.dead], [self.options.group])
        return QueueStats(ready=ready, delayed=delayed, in_flight=in_flight, dead=dead)

    async def purge(self, queue: str) -> int:
        q = self._queue(queue)
        await self._flush_consumers()
        total = 0
        with _mapped(f"purging queue {queue!r}"):
            while True:
                removed, more = await self._eval(
                    PURGE, [*q.streams, q.delayed], [self.options.group, 1000])
                total += int(removed)
                if not more:
                    return total

    async def dead_letters(self, queue: str, *, limit: int = 100) -> list[DeadLetter]:
        q = self._queue(queue)
        await self._flush_consumers()
        with _mapped(f"reading the dead letters of queue {queue!r}"):
            entries: list[Any] = await _cmd(self._redis_client, "XRANGE", q.dead, "-", "+",
                                            "COUNT", limit)
        out: list[DeadLetter] = []
        for entry_id, fields in entries:
            data = fields.get(b"e", b"")
            try:
                envelope = _decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                envelope = Envelope(id=entry_id.decode(), queue=queue, body=data,
                                    headers={"taskloom-malformed": "true"})
            out.append(DeadLetter(envelope=envelope,
                                  reason=fields.get(b"r", b"").decode(errors="replace"),
                                  delivery_count=int(fields.get(b"c", 0))))
        return out

    # -- helpers (not part of the protocol) -------------------------------------------

    async def purge_namespace(self) -> int:
        """Delete every key under this broker's namespace prefix (SCAN + UNLINK,
        never FLUSH). For tests and teardown; returns how many keys were deleted."""
        r = self._redis_client
        deleted = 0
        with _mapped(f"purging namespace {self._prefix!r}"):
            batch: list[bytes] = []
            async for key in r.scan_iter(match=_glob_escape(self._prefix) + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await r.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await r.unlink(*batch))
        return deleted

    def __repr__(self) -> str:
        return f"RedisBroker(url={_redact(self.url)!r}, namespace={self.namespace!r})"
