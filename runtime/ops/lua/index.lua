-- The task index: apply a batch of transitions (see runtime/ops/index/redis.py).
-- ARGV: prefix, max_per_state, cutoff_ms, ttl_ms, then a JSON array of transitions, each an
-- array of 17 strings:
-- id, name, queue, state, at_ms, attempt, worker, eta_ms, error_type, error, reason,
-- parent_id, root_id, order, entering (1 for enqueued/scheduled, 2 for started, 3 final, 0 else),
-- enqueued_ms, started_ms (seen earlier in the same batch, which the caller coalesced; or '')
local P = ARGV[1]
local max = tonumber(ARGV[2])
local cutoff = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local applied = 0

local function keys3(state, queue, name)
  local base = P .. 'ix:' .. state
  return base, base .. ':q:' .. queue, base .. ':n:' .. name
end

local function unlink(id, state, queue, name)
  local a, b, c = keys3(state, queue, name)
  redis.call('ZREM', a, id)
  redis.call('ZREM', b, id)
  redis.call('ZREM', c, id)
end

local function drop(id, main)
  redis.call('ZREM', main, id)
  local h = P .. 't:' .. id
  local old = redis.call('HMGET', h, 'state', 'queue', 'name')
  if old[1] then unlink(id, old[1], old[2], old[3]) end
  redis.call('DEL', h)
end

local function trim(main)
  local n = redis.call('ZCARD', main)
  if n > max then
    for _, id in ipairs(redis.call('ZRANGE', main, 0, n - max - 1)) do drop(id, main) end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', main, '-inf', '(' .. cutoff, 'LIMIT', 0, 100)) do
    drop(id, main)
  end
end

for _, A in ipairs(cjson.decode(ARGV[5])) do
  local id, name, queue, state, at = A[1], A[2], A[3], A[4], A[5]
  local order, entering = tonumber(A[14]), A[15]
  local h = P .. 't:' .. id
  local old = redis.call('HMGET', h, 'o', 'state', 'queue', 'name', 'enqueued_ms', 'started_ms', 'worker')
  if not old[1] or tonumber(old[1]) <= order then
    if old[2] then unlink(id, old[2], old[3], old[4]) end
    local enq, started, worker = old[5], old[6], A[7]
    if not enq and A[16] ~= '' then enq = A[16] end
    if entering == '1' and not enq then enq = at end
    if A[17] ~= '' then started = A[17] end
    if entering == '2' then started = at end
    if worker == '' then worker = old[7] or '' end
    redis.call('DEL', h)
    local f = {'id', id, 'name', name, 'queue', queue, 'state', state, 'at_ms', at,
               'attempt', A[6], 'o', A[14]}
    local function opt(k, v) if v and v ~= '' then f[#f + 1] = k; f[#f + 1] = v end end
    opt('worker', worker); opt('eta_ms', A[8]); opt('error_type', A[9])
    opt('error', A[10]); opt('reason', A[11]); opt('parent_id', A[12])
    opt('root_id', A[13]); opt('enqueued_ms', enq); opt('started_ms', started)
    if entering == '3' then opt('finished_ms', at) end
    redis.call('HSET', h, unpack(f))
    redis.call('PEXPIRE', h, ttl)
    local a, b, c = keys3(state, queue, name)
    redis.call('ZADD', a, at, id)
    redis.call('ZADD', b, at, id)
    redis.call('ZADD', c, at, id)
    trim(a)
    applied = applied + 1
  end
end
return applied
