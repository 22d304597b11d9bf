
-- KEYS: result keys. ARGV[1] ttl ms, ARGV[2] inline limit, then per key:
-- mark + msgpack, completion channel. Returns 1 (stored) or 0 per key.
local ttl, limit, out = ARGV[1], tonumber(ARGV[2]), {}
for i, key in ipairs(KEYS) do
  local data, channel = ARGV[2 * i + 1], ARGV[2 * i + 2]
  if redis.call('GETRANGE', key, 0, 0) == 'T' then
    out[i] = 0
  else
    redis.call('SET', key, data, 'PX', ttl)
    if string.byte(data, 1) == 84 then  -- 'T': the first terminal result
      if #data <= limit then redis.call('PUBLISH', channel, data)
      else redis.call('PUBLISH', channel, '') end
    end
    out[i] = 1
  end
end
return out
