-- KEYS: per queue, in the order to serve them: its 10 priority streams, then its dead stream.
-- ARGV: group, consumer, want, max deliveries, max entry bytes, byte budget.
-- Entries longer than the max are dead-lettered here as 'too_large' (their bytes never
-- leave Redis); the fetch stops once the entries found reach the byte budget.
-- Returns {entries (flat: key index, id, envelope, delivery count), key indexes of band-0
-- streams whose group was missing, ids dead-lettered at the limit, last id of every
-- priority stream (only when fewer than `want` were found)}.
local group, consumer = ARGV[1], ARGV[2]
local want, maxd = tonumber(ARGV[3]), tonumber(ARGV[4])
local maxb, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local bytes, taken = 0, 0
local per = 11
local nq = #KEYS / per
local out, lost, dead = {}, {}, {}
for band = 9, 0, -1 do
  for q = 0, nq - 1 do
    local ki = q * per + band + 1
    local key = KEYS[ki]
    if want > 0 and bytes < budget and (band == 0 or redis.call('EXISTS', key) == 1) then
      while want > 0 and bytes < budget do
        -- the first read of a fetch takes one entry; later reads as many as the
        -- budget left fits at the average size so far (entries are read whole)
        local asked = 1
        if taken > 0 then
          asked = math.min(want, math.max(1, math.floor((budget - bytes) * taken / bytes)))
        end
        local r = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked,
                              'STREAMS', key, '>')
        if failed(r) then
          redis.pcall('XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
          if band == 0 then lost[#lost + 1] = ki end
          r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', asked,
                         'STREAMS', key, '>')
        end
        if not r then break end
        local entries = r[1][2]
        for _, entry in ipairs(entries) do
          local id, f = entry[1], entry[2]
          local e, n = fields_of(f)
          local count = n + 1
          local reason = false
          if not e then
            reason = 'malformed_entry'
          elseif string.len(e) > maxb then
            reason = 'too_large'
          elseif maxd > 0 and count > maxd then
            reason = 'delivery_limit'
          end
          if reason then
            bury(KEYS[q * per + per], f, reason, count)
            redis.call('XACK', key, group, id)
            redis.call('XDEL', key, id)
            dead[#dead + 1] = id
          else
            out[#out + 1] = ki
            out[#out + 1] = id
            out[#out + 1] = e
            out[#out + 1] = count
            want = want - 1
            taken = taken + 1
            bytes = bytes + string.len(e)
          end
        end
        if #entries < asked then break end
      end
    end
  end
end
local last = {}
if want > 0 and bytes < budget then
  for q = 0, nq - 1 do
    for band = 0, 9 do
      local r = redis.call('XREVRANGE', KEYS[q * per + band + 1], '+', '-', 'COUNT', 1)
      last[#last + 1] = r[1] and r[1][1] or '0-0'
    end
  end
end
return {out, lost, dead, last}
