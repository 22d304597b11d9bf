-- KEYS: 10 priority streams, delayed set. ARGV: group, limit.
-- Deletes undelivered entries (after the group's last-delivered id) and delayed
-- messages. Returns {removed, 1 when more may remain}.
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
