-- KEYS: result keys. ARGV[1] inline limit, then per key: mark + msgpack,
-- completion channel, update channel, ttl ms. Returns 1 (stored) or 0 per key.
-- Every stored record pings the update channel (handle.updates()); the first
-- terminal one also goes to the completion channel (handle.result()).
local limit, out = tonumber(ARGV[1]), {}
for i, key in ipairs(KEYS) do
  local j = 4 * i - 2
  local data, channel, update, ttl = ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  if redis.call('GETRANGE', key, 0, 0) == 'T' then
    out[i] = 0
  else
    redis.call('SET', key, data, 'PX', ttl)
    if string.byte(data, 1) == 84 then  -- 'T': the first terminal result
      if #data <= limit then redis.call('PUBLISH', channel, data)
      else redis.call('PUBLISH', channel, '') end
    end
    redis.call('PUBLISH', update, '')
    out[i] = 1
  end
end
return out
