-- Clears the pending mark of wins that Postgres has recorded, unless the holder changed since
-- the job looked (released and won again: the new win is still pending).
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free (unused: every gate script takes the same keys),
-- KEYS[4] pending
-- ARGV[1] generation, then user, holder value pairs
-- Returns how many were settled.
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then
  return 0
end
local settled = 0
for i = 2, #ARGV, 2 do
  local holder = redis.call('HGET', KEYS[2], ARGV[i])
  if holder == ARGV[i + 1] or (not holder and ARGV[i + 1] == '') then
    settled = settled + redis.call('ZREM', KEYS[4], ARGV[i])
  end
end
return settled
