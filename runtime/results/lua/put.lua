-- KEYS: per result, its result key then its expiry-marker key. ARGV[1] inline
-- limit, ARGV[2] marker ttl ms (twice a result's own ttl if longer), then per result: mark + msgpack, completion
-- channel, update channel, ttl ms. Returns 1 (stored) or 0 per result.
-- Every stored record pings the update channel (handle.updates()); the first
-- terminal one also goes to the completion channel (handle.result()) and sets
-- the id's expiry marker, which outlives the result: a reader that finds the
-- marker but no result knows the result expired (ResultExpired).
local limit, marker, out = tonumber(ARGV[1]), tonumber(ARGV[2]), {}
for i = 1, #KEYS / 2 do
  local key, j = KEYS[2 * i - 1], 4 * i - 1
  local data, channel, update, ttl = ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  if redis.call('GETRANGE', key, 0, 0) == 'T' then
    out[i] = 0
  else
    redis.call('SET', key, data, 'PX', ttl)
    if string.byte(data, 1) == 84 then  -- 'T': the first terminal result
      redis.call('SET', KEYS[2 * i], '1', 'PX', math.max(marker, 2 * tonumber(ttl)))
      if #data <= limit then redis.call('PUBLISH', channel, data)
      else redis.call('PUBLISH', channel, '') end
    end
    redis.call('PUBLISH', update, '')
    out[i] = 1
  end
end
return out
