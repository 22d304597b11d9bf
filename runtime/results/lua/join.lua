
-- KEYS[1] join hash; ARGV[1] index; ARGV[2] size; ARGV[3] msgpack value; ARGV[4] ttl ms
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local size = tonumber(ARGV[2])
if redis.call('HLEN', KEYS[1]) < size then return false end
local out, fields = {}, {}
for i = 0, size - 1 do
  fields[#fields + 1] = tostring(i)
  if #fields == 1000 or i == size - 1 then
    local values = redis.call('HMGET', KEYS[1], unpack(fields))
    for j = 1, #values do out[#out + 1] = values[j] end
    fields = {}
  end
end
return out
