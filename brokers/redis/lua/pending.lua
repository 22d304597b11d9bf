-- KEYS: 10 priority streams. ARGV: group, consumer, limit.
-- The entries pending for the consumer (its own PEL), without touching them.
-- Returns entries (flat: key index, id, envelope, delivery count).
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
