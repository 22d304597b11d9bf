-- One batch of the operations log (runtime/ops/writer.py): events appended to the
-- stream and task transitions applied to the task index, in one call.
-- ARGV: prefix, max_per_state, cutoff_ms, ttl_ms, stream key ('' : no events), stream
-- max_len, '1' to apply task events to the index ('0' : not), then the events' JSON
-- joined by "\n" (JSON text never holds a raw newline).
-- A task event ({"kind":"task", ...}: the fields of runtime.lifecycle.Transition) also
-- moves its task in the index. Of one task's steps in a batch only the latest (by order:
-- ends beat everything, then attempts, then the step) is written, with the earliest
-- enqueue and latest start time seen beside it. Each sorted set gets one ZADD and one ZREM
-- per call (members gathered), and each state's set touched is trimmed to its count and
-- age once, at the end. Returns the number of tasks written.
local P, max, cutoff, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local stream, maxlen, indexing, blob = ARGV[5], ARGV[6], ARGV[7] == '1', ARGV[8]
local call, find, sub, fmt, decode, NULL =
  redis.call, string.find, string.sub, string.format, cjson.decode, cjson.null
local RANK = {enqueued = 0, scheduled = 0, started = 1, retrying = 2}
local FINAL = {succeeded = true, failed = true, dead_lettered = true, revoked = true,
               expired = true}

local function given(v) return v and v ~= NULL and v ~= '' end
local function int(v) return fmt('%d', v) end

-- read the batch: stream every event, gather each task's latest step
local ids, latest = {}, {}
local pos, n = 1, #blob
while pos <= n do
  local stop = find(blob, '\n', pos, true) or n + 1
  local ev = sub(blob, pos, stop - 1)
  pos = stop + 1
  if stream ~= '' then call('XADD', stream, '*', 'e', ev) end
  if indexing and sub(ev, 1, 15) == '{"kind":"task",' then
    local e = decode(ev)
    local state = e.phase
    local rank = RANK[state]
    local o = (FINAL[state] and 1073741824 or 0) + (given(e.attempt) and e.attempt or 1) * 4
      + (rank or 3)
    local cur = latest[e.id]
    if not cur then
      cur = {o = -1}
      latest[e.id] = cur
      ids[#ids + 1] = e.id
    end
    if o >= cur.o then cur.o, cur.e = o, e end
    if rank == 0 and (not cur.enq or e.at_ms < cur.enq) then cur.enq = e.at_ms end
    if rank == 1 and (not cur.started or e.at_ms > cur.started) then cur.started = e.at_ms end
  end
end
if stream ~= '' and n > 0 then call('XTRIM', stream, 'MAXLEN', '~', maxlen) end

-- the three sets of (state, queue, name), each key built once per call
local sets = {}
local function sets_of(state, queue, name)
  local tag = state .. '\0' .. queue .. '\0' .. name
  local s = sets[tag]
  if not s then
    local main = P .. 'ix:' .. state
    s = {main, main .. ':q:' .. queue, main .. ':n:' .. name}
    sets[tag] = s
  end
  return s
end

-- one ZADD / ZREM per set and call, not one per task: members gathered per key
local adds, add_keys, rems, rem_keys = {}, {}, {}, {}
local function gather(into, keys, key, a, b)
  local list = into[key]
  if not list then
    list = {}
    into[key] = list
    keys[#keys + 1] = key
  end
  list[#list + 1] = a
  if b then list[#list + 1] = b end
end

-- a command over many members, in slices (unpack has a limit)
local function many(cmd, key, list)
  for i = 1, #list, 1000 do call(cmd, key, unpack(list, i, math.min(i + 999, #list))) end
end

-- write each task's latest step (unless the index holds a later one)
local touched, mains, written = {}, {}, 0
local f, k = {}, 0
local function opt(key, v)
  if given(v) then f[k + 1] = key; f[k + 2] = v; k = k + 2 end
end
for _, id in ipairs(ids) do
  local c = latest[id]
  local e = c.e
  local h = P .. 't:' .. id
  local old = call('HMGET', h, 'o', 'state', 'queue', 'name', 'enqueued_ms', 'started_ms',
                   'worker')
  if not old[1] or tonumber(old[1]) <= c.o then
    local state, queue, name, at = e.phase, e.queue, e.task, int(e.at_ms)
    if old[2] then
      for _, key in ipairs(sets_of(old[2], old[3], old[4])) do gather(rems, rem_keys, key, id) end
    end
    if old[1] or old[2] then call('DEL', h) end
    local enq, started, worker = old[5], old[6], e.worker
    if not enq and c.enq then enq = int(c.enq) end
    if c.started then started = int(c.started) end
    if not given(worker) then worker = old[7] end
    f = {'id', id, 'name', name, 'queue', queue, 'state', state, 'at_ms', at,
         'attempt', given(e.attempt) and int(e.attempt) or '1', 'o', int(c.o)}
    k = #f
    opt('worker', worker)
    if given(e.eta_ms) then opt('eta_ms', int(e.eta_ms)) end
    opt('error_type', e.error_type); opt('error', e.error); opt('reason', e.reason)
    opt('parent_id', e.parent_id); opt('root_id', e.root_id)
    opt('enqueued_ms', enq); opt('started_ms', started)
    if FINAL[state] then opt('finished_ms', at) end
    call('HSET', h, unpack(f))
    call('PEXPIRE', h, ttl)
    local new = sets_of(state, queue, name)
    for _, key in ipairs(new) do gather(adds, add_keys, key, at, id) end
    if not touched[new[1]] then
      touched[new[1]] = true
      mains[#mains + 1] = new[1]
    end
    written = written + 1
  end
end
-- removals first: a task that stays in its state (a new attempt) is removed, then added
for _, key in ipairs(rem_keys) do many('ZREM', key, rems[key]) end
for _, key in ipairs(add_keys) do many('ZADD', key, adds[key]) end

-- retention: each touched state keeps its newest `max`, none older than the cutoff
local gone, gone_keys = {}, {}
local function drop(id, main)
  gather(gone, gone_keys, main, id)
  local h = P .. 't:' .. id
  local old = call('HMGET', h, 'state', 'queue', 'name')
  if old[1] then
    for _, key in ipairs(sets_of(old[1], old[2], old[3])) do gather(gone, gone_keys, key, id) end
  end
  call('DEL', h)
end
for _, main in ipairs(mains) do
  local count = call('ZCARD', main)
  if count > max then
    for _, id in ipairs(call('ZRANGE', main, 0, count - max - 1)) do drop(id, main) end
  end
  for _, id in ipairs(call('ZRANGEBYSCORE', main, '-inf', '(' .. int(cutoff), 'LIMIT', 0,
                           1000)) do
    drop(id, main)
  end
end
for _, key in ipairs(gone_keys) do many('ZREM', key, gone[key]) end
return written
