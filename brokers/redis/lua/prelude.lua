-- Helpers prepended to the scripts that use them (see scripts.py).
local function fields_of(f)
  local e, n = false, 0
  if not f then return e, n end
  for i = 1, #f, 2 do
    local k = f[i]
    if k == 'e' then e = f[i + 1] elseif k == 'n' then n = tonumber(f[i + 1]) or 0 end
  end
  return e, n
end
local function bury(dlq, f, reason, count)
  local args = {}
  if f then
    for i = 1, #f, 2 do
      local k = f[i]
      if k ~= 'n' and k ~= 'r' and k ~= 'c' then
        args[#args + 1] = k
        args[#args + 1] = f[i + 1]
      end
    end
  end
  args[#args + 1] = 'r'
  args[#args + 1] = reason
  args[#args + 1] = 'c'
  args[#args + 1] = tostring(count)
  redis.call('XADD', dlq, '*', unpack(args))
end
local function failed(r)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'NOGROUP', 1, true) then return 'nogroup' end
    error(r)
  end
  return false
end
local function now_ms(round)
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + round(tonumber(t[2]) / 1000)
end
