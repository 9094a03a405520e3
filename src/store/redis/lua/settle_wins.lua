-- Marks wins as recorded in Postgres: clears their pending mark and writes the id of the
-- holder's coupon row into the holder value, so a repeat call is answered by the issue script
-- alone. Only where the holder is still the one the caller looked at (released and won again:
-- the new win is still pending) and the gate was not rebuilt since (the rebuild read Postgres).
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free (unused: every gate script takes the same keys),
-- KEYS[4] pending
-- ARGV[1] generation, then triples: user, holder value seen ('' for none), holder value to
-- write ('' to only clear the pending mark).
-- Returns how many were settled.
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then
  return 0
end
local settled = 0
for i = 2, #ARGV, 3 do
  local holder = redis.call('HGET', KEYS[2], ARGV[i])
  if holder == ARGV[i + 1] or (not holder and ARGV[i + 1] == '') then
    if holder and ARGV[i + 2] ~= '' then
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    end
    redis.call('ZREM', KEYS[4], ARGV[i])
    settled = settled + 1
  end
end
return settled
