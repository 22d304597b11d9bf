-- KEYS: delayed set, 10 priority streams. ARGV: limit.
-- Moves due messages (member: nonce '|' band count ':' envelope) into their streams.
-- Returns {moved, ms until the next is due or -1, malformed members dropped}.
local now = now_ms(math.floor)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now),
                       'LIMIT', 0, tonumber(ARGV[1]))
local bad = 0
for _, m in ipairs(due) do
  local p = string.find(m, '|', 1, true)
  local c = p and string.find(m, ':', p + 2, true)
  local band = p and tonumber(string.sub(m, p + 1, p + 1))
  if c and band then
    redis.call('XADD', KEYS[band + 2], '*', 'e', string.sub(m, c + 1),
               'n', string.sub(m, p + 2, c - 1))
  else
    bad = bad + 1
  end
  redis.call('ZREM', KEYS[1], m)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if nxt[2] then wait = math.max(0, tonumber(nxt[2]) - now) end
return {#due, wait, bad}
