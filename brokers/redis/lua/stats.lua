-- KEYS: 10 priority streams, delayed set, dead stream. ARGV: group.
-- Returns {ready, delayed, in flight, dead}.
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
