-- KEYS: 10 priority streams, delayed set.
-- ARGV: number of plain messages (priority 0, no delay), those encoded envelopes,
-- then 3 per other message: band, delay ms, encoded envelope (a delayed-set member
-- when delayed).
local plain = tonumber(ARGV[1])
for i = 2, plain + 1 do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
end
local now = nil
for i = plain + 2, #ARGV, 3 do
  local delay = tonumber(ARGV[i + 1])
  if delay > 0 then
    now = now or now_ms(math.ceil)
    redis.call('ZADD', KEYS[11], string.format('%.0f', now + delay), ARGV[i + 2])
  else
    redis.call('XADD', KEYS[tonumber(ARGV[i]) + 1], '*', 'e', ARGV[i + 2])
  end
end
return #ARGV
