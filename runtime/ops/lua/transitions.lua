-- One batch of the operations log (runtime/ops/writer.py): the events appended to the
-- stream as one entry, and task transitions applied to the task index (layout 2), in
-- one call.
-- ARGV: prefix, max_per_state, cutoff_ms, ttl_ms, stream key ('' : no events), stream
-- max_len (events), '1' to apply task events to the index ('0' : not), the number of
-- events, then the events' JSON joined by "\n" (JSON text never holds a raw newline).
-- The stream (wire 2, see runtime/ops/events.py): one entry per call, fields v = '2',
-- n = the number of events, b = the events' JSON as given; beside it
--   P events:held  zset    entry id -> events written up to and including it (a running
--                          total), so that the stream is trimmed by events, not entries
-- Keys of the index (P = prefix; see runtime/ops/index/redis.py):
--   P ix2:<state>     zset    task id -> time it entered the state (ms)
--   P ix2:<state>:c   hash    'q:<queue>' / 'n:<task name>' -> tasks of the state
--   P t2:<id>         string  'v2 <order> <enqueued_ms|-> <started_ms|-> <state> <worker>'
--                             "\n" then the JSON of the task's latest event; PX ttl
-- A task event ({"kind":"task", ...}: the fields of runtime.lifecycle.Transition) also
-- moves its task in the index. Of one task's steps in a batch only the latest (by order:
-- ends beat everything, then attempts, then the step) is written, with the earliest
-- enqueue and latest start time seen beside it: one GET and one SET per task, one ZADD
-- and one ZREM per state's set and call (members gathered), one HINCRBY per count
-- changed in the call, and each state's set touched is trimmed to its count and age
-- once, at the end. Returns the number of tasks written.
local P, max, cutoff, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local stream, maxlen, indexing = ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1'
local events, blob = tonumber(ARGV[8]), ARGV[9]
local call, find, sub, match, fmt, decode, NULL =
  redis.call, string.find, string.sub, string.match, string.format, cjson.decode, cjson.null
local RANK = {enqueued = 0, scheduled = 0, started = 1, retrying = 2}
local FINAL = {succeeded = true, failed = true, dead_lettered = true, revoked = true,
               expired = true}

local function given(v) return v and v ~= NULL and v ~= '' end
local function int(v) return fmt('%d', v) end

-- A task event's fields. msgspec writes them in a fixed order (id, task, queue, phase,
-- at_ms, attempt unless 1, worker unless ''), so a pattern reads them without decoding
-- the JSON; a value with an escape in it (or any other shape) goes through cjson.
local HEAD = '"id":"([^"\\]*)","task":"([^"\\]*)","queue":"([^"\\]*)","phase":"([%l_]+)",'
  .. '"at_ms":(%d+)'
local function fields(ev)
  local _, stop, id, task, queue, phase, at = find(ev, HEAD)
  if stop then
    local worker = match(ev, '"worker":"([^"\\]*)"', stop)
    if worker or not find(ev, '"worker":"', stop, true) then
      return id, task, queue, phase, tonumber(at),
        tonumber(match(ev, '^,"attempt":(%d+)', stop + 1)) or 1, worker or ''
    end
  end
  local e = decode(ev)
  local worker = given(e.worker) and string.gsub(e.worker, '[\r\n]', ' ') or ''
  return e.id, e.task, e.queue, e.phase, e.at_ms, given(e.attempt) and e.attempt or 1, worker
end

-- the stream: the batch as one entry, then the oldest entries dropped while the newer
-- ones still hold max_len events
if stream ~= '' and events > 0 then
  local held = stream .. ':held'
  local id = call('XADD', stream, '*', 'v', '2', 'n', events, 'b', blob)
  local newest = call('ZRANGE', held, -1, -1, 'WITHSCORES')
  local total = (tonumber(newest[2]) or 0) + events
  call('ZADD', held, total, id)
  local keep = call('ZRANGEBYSCORE', held, '(' .. fmt('%d', total - maxlen), '+inf', 'LIMIT',
                    0, 1)
  -- (older entries of wire 1, one event each and not counted, go with the first trim)
  if keep[1] and call('ZREMRANGEBYSCORE', held, '-inf', fmt('%d', total - maxlen)) > 0 then
    call('XTRIM', stream, 'MINID', keep[1])
  end
end
if not indexing then return 0 end

-- read the batch: gather each task's latest step
local ids, latest = {}, {}
local pos, n = 1, #blob
while pos <= n do
  local stop = find(blob, '\n', pos, true) or n + 1
  local ev = sub(blob, pos, stop - 1)
  pos = stop + 1
  if sub(ev, 1, 15) == '{"kind":"task",' then
    local id, task, queue, state, at, attempt, worker = fields(ev)
    local rank = RANK[state]
    local o = (FINAL[state] and 1073741824 or 0) + attempt * 4 + (rank or 3)
    local cur = latest[id]
    if not cur then
      cur = {o = -1}
      latest[id] = cur
      ids[#ids + 1] = id
    end
    if o >= cur.o then
      cur.o, cur.ev, cur.state, cur.queue, cur.task, cur.at, cur.w =
        o, ev, state, queue, task, at, worker
    end
    if worker ~= '' then cur.anyw = worker end
    if rank == 0 and (not cur.enq or at < cur.enq) then cur.enq = at end
    if rank == 1 and (not cur.started or at > cur.started) then cur.started = at end
  end
end

-- members gathered per key: one ZADD / ZREM per set and call, not one per task
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

-- the counts per queue and per task name of each state, summed over the call
local deltas, delta_keys = {}, {}
local function count(state, queue, name, by)
  local key = P .. 'ix2:' .. state .. ':c'
  local d = deltas[key]
  if not d then
    d = {}
    deltas[key] = d
    delta_keys[#delta_keys + 1] = key
  end
  local q, nm = 'q:' .. queue, 'n:' .. name
  d[q] = (d[q] or 0) + by
  d[nm] = (d[nm] or 0) + by
end

-- a command over many members, in slices (unpack has a limit)
local function many(cmd, key, list)
  for i = 1, #list, 1000 do call(cmd, key, unpack(list, i, math.min(i + 999, #list))) end
end

-- a stored summary: order, enqueued, started, state, worker, the event's JSON
local STORED = '^v2 (%d+) (%S+) (%S+) (%S+) ([^\n]*)\n()'
local function stored(raw)
  if not raw then return nil end
  local o, enq, started, state, worker, at = match(raw, STORED)
  if not o then return nil end
  return tonumber(o), enq, started, state, worker, sub(raw, at)
end

-- write each task's latest step (unless the index holds a later one)
local touched, mains, written = {}, {}, 0
for _, id in ipairs(ids) do
  local c = latest[id]
  local key = P .. 't2:' .. id
  local oo, oenq, ostarted, ostate, oworker, ojson = stored(call('GET', key))
  if not oo or oo <= c.o then
    if ostate then
      gather(rems, rem_keys, P .. 'ix2:' .. ostate, id)
      local _, otask, oqueue = fields(ojson)
      count(ostate, oqueue, otask, -1)
    end
    local enq = (oenq and oenq ~= '-' and oenq) or (c.enq and int(c.enq)) or '-'
    local started = (c.started and int(c.started)) or ostarted or '-'
    local worker = (c.w ~= '' and c.w) or c.anyw or oworker or ''
    call('SET', key, 'v2 ' .. int(c.o) .. ' ' .. enq .. ' ' .. started .. ' ' .. c.state
      .. ' ' .. worker .. '\n' .. c.ev, 'PX', ttl)
    local main = P .. 'ix2:' .. c.state
    gather(adds, add_keys, main, int(c.at), id)
    count(c.state, c.queue, c.task, 1)
    if not touched[main] then
      touched[main] = c.state
      mains[#mains + 1] = main
    end
    written = written + 1
  end
end
-- removals first: a task that stays in its state (a new attempt) is removed, then added
for _, key in ipairs(rem_keys) do many('ZREM', key, rems[key]) end
for _, key in ipairs(add_keys) do many('ZADD', key, adds[key]) end

-- retention: each touched state keeps its newest `max`, none older than the cutoff
local gone, gone_keys = {}, {}
local function drop(id, main, state)
  gather(gone, gone_keys, main, id)
  local key = P .. 't2:' .. id
  local _, _, _, ostate, _, ojson = stored(call('GET', key))
  if ostate == state then  -- else the entry was stale: the summary is another state's
    local _, otask, oqueue = fields(ojson)
    count(state, oqueue, otask, -1)
    call('DEL', key)
  end
end
for _, main in ipairs(mains) do
  local state = touched[main]
  local total = call('ZCARD', main)
  if total > max then
    for _, id in ipairs(call('ZRANGE', main, 0, total - max - 1)) do drop(id, main, state) end
  end
  for _, id in ipairs(call('ZRANGEBYSCORE', main, '-inf', '(' .. int(cutoff), 'LIMIT', 0,
                           1000)) do
    drop(id, main, state)
  end
end
for _, key in ipairs(gone_keys) do many('ZREM', key, gone[key]) end

-- the counts: one HINCRBY per count changed; none kept at zero
for _, key in ipairs(delta_keys) do
  for field, by in pairs(deltas[key]) do
    if by ~= 0 and call('HINCRBY', key, field, by) <= 0 then call('HDEL', key, field) end
  end
end
return written
