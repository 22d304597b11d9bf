-- KEYS: result keys reserved by enqueue(task_id=...); ARGV: the reservation
-- record written to each. Deletes a key that still holds only its reservation
-- (a worker's record replaces it); returns how many were deleted.
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
