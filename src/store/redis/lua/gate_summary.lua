-- Counts a coupon's gate in one atomic step, for the reconciliation job: O(1) whatever the
-- number of holders (HLEN, LLEN and ZCARD are constant-time).
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free, KEYS[4] pending
-- Returns {total, next, free seats, holders, pending wins, gen, ends (ms)} or {} when not loaded.
local state = redis.call('HMGET', KEYS[1], 'total', 'next', 'gen', 'ends')
if not state[1] then
  return {}
end
-- Both the holders hash and the pending set carry one sentinel entry.
return {tonumber(state[1]), tonumber(state[2]), redis.call('LLEN', KEYS[3]),
  redis.call('HLEN', KEYS[2]) - 1, math.max(redis.call('ZCARD', KEYS[4]) - 1, 0), state[3],
  tonumber(state[4])}
