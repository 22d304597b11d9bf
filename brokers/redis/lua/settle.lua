-- KEYS: 10 priority streams, delayed set, dead stream.
-- ARGV: group, the acked ids joined by ',' (each prefixed with its band digit), then
-- 5 per other settlement: verb ('n' nack, 'd' dead-letter), band, id, delivery count,
-- delay ms (nack) or reason (dead-letter).
-- Returns {settled, not pending any more, group missing}.
local group = ARGV[1]
local acks = {}
local settled, missing, lost = 0, 0, 0
for a in string.gmatch(ARGV[2], '[^,]+') do
  local k = string.byte(a, 1) - 47
  local list = acks[k]
  if not list then
    list = {}
    acks[k] = list
  end
  list[#list + 1] = string.sub(a, 2)
end
for i = 3, #ARGV, 5 do
  local verb, band, id = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local key = KEYS[band + 1]
  local r = redis.pcall('XACK', key, group, id)
  if failed(r) then
    lost = lost + 1
  elseif r == 0 then
    missing = missing + 1
  else
    local count, arg = ARGV[i + 3], ARGV[i + 4]
    local entry = redis.call('XRANGE', key, id, id)[1]
    local f = entry and entry[2]
    local e = fields_of(f)
    if verb == 'n' and e then
      local delay = tonumber(arg)
      if delay > 0 then
        local due = now_ms(math.ceil) + delay
        redis.call('ZADD', KEYS[11], string.format('%.0f', due),
                   id .. '/' .. band .. '|' .. band .. count .. ':' .. e)
      else
        redis.call('XADD', key, '*', 'e', e, 'n', count)
      end
    else
      bury(KEYS[12], f, verb == 'n' and 'malformed_entry' or arg, count)
    end
    redis.call('XDEL', key, id)
    settled = settled + 1
  end
end
for k, list in pairs(acks) do
  local key = KEYS[k]
  for s = 1, #list, 1000 do
    local chunk = {unpack(list, s, math.min(s + 999, #list))}
    local r = redis.pcall('XACK', key, group, unpack(chunk))
    if failed(r) then
      lost = lost + #chunk
    else
      settled = settled + r
      missing = missing + #chunk - r
    end
    redis.call('XDEL', key, unpack(chunk))
  end
end
return {settled, missing, lost}
