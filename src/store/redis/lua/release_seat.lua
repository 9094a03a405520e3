-- Undoes one win that did not become a coupon: a failed Postgres insert, or an orphan (a win
-- whose insert never ran, found by a later call or by the reconciliation job). Removes the
-- holder and its pending mark and, when the seat is still free in Postgres, gives it back.
-- Does nothing if the gate was rebuilt since the win (another generation: the rebuild read
-- Postgres, which is the truth) or if the holder changed since the caller looked.
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free, KEYS[4] pending
-- ARGV[1] user id, ARGV[2] holder value the win wrote, ARGV[3] generation of the win,
-- ARGV[4] "1" to give the seat back, ARGV[5] the seat
-- Returns 1 when undone, 0 when there was nothing to undo.
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[3] then
  return 0
end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[4] == '1' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
  -- The list may have been emptied (and deleted) since the load: keep the state's expiry.
  redis.call('PEXPIRE', KEYS[3], redis.call('PTTL', KEYS[1]))
end
return 1
