-- KEYS: 10 priority streams, dead stream. ARGV: group, consumer.
-- Puts every entry pending for the consumer back at the end of its stream, counting
-- the delivery, then deletes the consumer. Returns how many were put back.
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
