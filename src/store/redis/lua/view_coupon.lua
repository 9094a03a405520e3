-- Reads a coupon's whole gate in one atomic step, for the reconciliation job.
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free
-- Returns {total, next, free seat count, {user, holder, ...}} or {} when not loaded.
local state = redis.call('HMGET', KEYS[1], 'total', 'next')
if not state[1] then
  return {}
end
return {tonumber(state[1]), tonumber(state[2]), redis.call('LLEN', KEYS[3]),
  redis.call('HGETALL', KEYS[2])}
