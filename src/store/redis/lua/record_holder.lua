-- Writes the id of a holder's coupon row into the holder value once the caller knows the row is
-- committed (its insert returned, or Postgres was read), so the user's repeat calls are answered
-- by the issue script alone. Only where the holder is still the one the caller saw and the gate
-- was not rebuilt since (the rebuild read Postgres).
--
-- The pending mark stays: only the reconciliation job clears it, because the job counts the
-- rows in Postgres before it reads the gate and relies on every holder whose row it may not
-- have counted being pending.
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free, KEYS[4] pending (unused: every gate script
-- takes the same keys)
-- ARGV[1] generation, ARGV[2] user, ARGV[3] holder value seen, ARGV[4] holder value to write
-- Returns 1 when written, 0 when the holder or the gate changed.
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[2], ARGV[2]) ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[4])
return 1
