-- KEYS: 10 priority streams, dead stream.
-- ARGV: group, consumer, min idle ms, want, max deliveries, stale consumer ms.
-- Returns {entries (flat: key index, id, envelope, count), deleted (flat: key index, id),
-- ids dead-lettered}.
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
