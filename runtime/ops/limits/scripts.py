"""The Redis limiter store's Lua scripts (one atomic call per operation) and
the constants the memory store shares with them, so that both stores answer
alike. See ``store`` for the key layout and what the scripts decide."""

from __future__ import annotations

__all__ = ["ADMIT_SCRIPT", "EARLY_MS", "HOLD_KEEP_MS", "HOLD_WEIGHT", "INDEX_KEEP_MS",
           "RELEASE_SCRIPT", "RENEW_SCRIPT", "SNAPSHOT_SCRIPT", "SPACING", "UNIQUE_SCRIPT",
           "WAIT_KEEP_MS"]

#: A deferred task's waiting entry is dropped this long after it was due.
WAIT_KEEP_MS = 60_000
#: An index entry (and its counter) is dropped this long after its last use.
INDEX_KEEP_MS = 86_400_000
#: A waiter back this early before its reserved rate slot is admitted (clock and
#: delay-store rounding); later than that early, it is sent back for the rest.
EARLY_MS = 2.0
#: Concurrency waiters come back this fraction of the mean time between releases
#: apart: a little faster than permits free, so that a permit rarely waits idle.
#: 0.5 sent about 3.7 waiters back per run (100 waiters, 2 keys x 2 permits held
#: 250 ms, retry 5 ms, simulated); 0.75 about 2.9, the limited tasks' own rate
#: 13.5 -> 12.4/s of 16/s at most (benchmarks/README.md, limits).
SPACING = 0.75
#: Weight of the newest hold in the running mean hold time of a key's permits.
HOLD_WEIGHT = 0.2
#: The mean hold time of a key is forgotten this long after its last release.
HOLD_KEEP_MS = 3_600_000

NOW_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

DEFER_LUA = """
local function defer(wait, member, delay, score)
  redis.call('ZADD', wait, score or now + delay, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', wait, '-inf', now - WAIT_KEEP_MS)
  redis.call('PEXPIRE', wait, INDEX_KEEP_MS)
  redis.call('HINCRBY', KEYS[6], member, 1)
  redis.call('ZADD', KEYS[7], now, member)
end
local function ran(wait, member)
  redis.call('ZREM', wait, ARGV[2])
  redis.call('ZADD', KEYS[7], now, member)
end
""".replace("WAIT_KEEP_MS", str(WAIT_KEEP_MS)).replace("INDEX_KEEP_MS", str(INDEX_KEEP_MS))

# KEYS: 1 debounce, 2 sem, 3 sem wait, 4 rate (reservations), 5 rate wait (holder ->
#       reserved slot), 6 stats, 7 index, 8 sem wake, 9 sem hold, 10 rate starts (zset)
# ARGV: 1 now ms ('' = Redis TIME), 2 holder, 3 concurrency limit (0: none), 4 lease ms,
#       5 interval ms (0: no rate), 6 burst, 7 sem member, 8 rate member, 9 retry ms,
#       10 debounce ('1' / '0'), 11 rate count (starts per period; 0: no start window)
# Returns {status, delay ms as text | latest id}
ADMIT_SCRIPT = (NOW_LUA + DEFER_LUA + """
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
      -- the waiters of a key come back one by one, spaced by the expected time
      -- between two releases (mean hold / limit), each after those before it;
      -- the youngest holder's age bounds the mean hold from below
      local hold = tonumber(redis.call('GET', KEYS[9]) or '') or 0
      local youngest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
      local age = now - (tonumber(youngest[2]) - tonumber(ARGV[4]))
      if age > hold then hold = age end
      local wake = tonumber(redis.call('GET', KEYS[8]) or '') or now
      if wake < now then wake = now end
      wake = wake + math.max(hold * SPACING / limit, tonumber(ARGV[9]))
      redis.call('SET', KEYS[8], string.format('%.3f', wake), 'PX', math.ceil(wake - now) + 1000)
      defer(KEYS[3], ARGV[7], wake - now)
      return {2, tostring(wake - now)}
    end
    took = true
  end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[2])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) + 1000)
  ran(KEYS[3], ARGV[7])
end
local interval = tonumber(ARGV[5])
if interval > 0 then
  local burst = tonumber(ARGV[6])
  local slot = tonumber(redis.call('ZSCORE', KEYS[5], ARGV[2]) or '')
  if not slot then
    -- reserve this caller the next free slot (now, if the bucket allows it)
    local tat = tonumber(redis.call('GET', KEYS[4]) or '') or now
    if tat < now then tat = now end
    slot = tat - (burst - 1) * interval
    local new = tat + interval
    redis.call('SET', KEYS[4], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1000)
  end
  local wait_ms = slot - now
  if wait_ms <= EARLY_MS then
    -- its slot has come: it starts unless the last period already holds
    -- count + burst - 1 starts (waiters the delay store hands back late in a bunch)
    local count = tonumber(ARGV[11])
    local most = count + burst - 1
    local period = count * interval
    wait_ms = 0
    if count > 0 then
      redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', now - period)
      local n = redis.call('ZCARD', KEYS[10])
      if n >= most then
        local first = redis.call('ZRANGE', KEYS[10], n - most, n - most, 'WITHSCORES')
        wait_ms = tonumber(first[2]) + period - now + 0.001
      end
    end
    if wait_ms <= 0 then
      if count > 0 then
        redis.call('ZADD', KEYS[10], now, ARGV[2])
        redis.call('PEXPIRE', KEYS[10], math.ceil(period) + 1000)
      end
      ran(KEYS[5], ARGV[8])
    else
      -- after the waiters of earlier slots, one interval each; it keeps its slot
      wait_ms = wait_ms + interval * redis.call('ZCOUNT', KEYS[5], '-inf', '(' .. slot)
    end
  end
  if wait_ms > 0 then
    if took then redis.call('ZREM', KEYS[2], ARGV[2]) end
    defer(KEYS[5], ARGV[8], wait_ms, slot)
    return {1, tostring(wait_ms)}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - """ + str(INDEX_KEEP_MS) + """)
return {0, '0'}
""").replace("EARLY_MS", repr(EARLY_MS)).replace("SPACING", repr(SPACING))

# KEYS: 1 sem, 2 sem hold. ARGV: 1 holder, 2 hold ms ('' = unknown)
RELEASE_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
local sample = tonumber(ARGV[2])
if sample then
  local old = tonumber(redis.call('GET', KEYS[2]) or '')
  local mean = sample
  if old then mean = old + HOLD_WEIGHT * (sample - old) end
  redis.call('SET', KEYS[2], string.format('%.3f', mean), 'PX', HOLD_KEEP_MS)
end
return 0
""".replace("HOLD_WEIGHT", repr(HOLD_WEIGHT)).replace("HOLD_KEEP_MS", str(HOLD_KEEP_MS))

# KEYS: sem zsets. ARGV: 1 now ('' = TIME), 2 lease ms, 3.. holders (one per key)
RENEW_SCRIPT = NOW_LUA + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2]), ARGV[i + 2])
  redis.call('PEXPIRE', key, tonumber(ARGV[2]) + 1000)
end
return 0
"""

# KEYS: unique key. ARGV: 1 now (unused), 2 task id, 3 ttl ms
UNIQUE_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
return redis.call('GET', KEYS[1])
"""

# KEYS: index, stats, then rate/sem/wait keys per member. ARGV: 1 now
SNAPSHOT_SCRIPT = NOW_LUA + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - """ + str(INDEX_KEEP_MS) + """)
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
  local waiting = redis.call('ZCOUNT', wait, now - """ + str(WAIT_KEEP_MS) + """, '+inf')
  local deferred = redis.call('HGET', KEYS[2], m) or '0'
  table.insert(out, m)
  table.insert(out, state)
  table.insert(out, tostring(waiting))
  table.insert(out, deferred)
end
return out
"""
