-- Decides one coupon request atomically: loaded? already a holder? in the issue window? a seat
-- left? then takes the seat, records the holder and marks the win pending (not yet known to be
-- recorded in Postgres).
--
-- KEYS[1] state   hash: total, next (next never-used seat), starts, ends (ms), gen; or missing=1
-- KEYS[2] holders hash: user id -> "seat:won_at_ms", then ":user_coupon_id" once the holder's
--                 row is known to be committed (and the sentinel field "_")
-- KEYS[3] free    list: seats given back (failed inserts, released orphans)
-- KEYS[4] pending zset: user id -> won_at_ms, wins not yet confirmed in Postgres (and the
--                 sentinel member "_" at +inf)
-- ARGV[1] user id, ARGV[2] now (ms)
--
-- Returns {"OK", seat, holder value, gen} | {"NOT_LOADED"} | {"NOT_FOUND"} | {"NOT_ISSUABLE"}
--       | {"ALREADY", holder value, gen} | {"SOLD_OUT"}
-- A holder value with its row's id answers a repeat call (COUPON_ALREADY_ISSUED) by itself.
local state = redis.call('HMGET', KEYS[1], 'total', 'next', 'starts', 'ends', 'gen', 'missing')
if not state[1] then
  if state[6] then
    return {'NOT_FOUND'}
  end
  return {'NOT_LOADED'}
end
-- A holder is told so whatever the window: the answer a replica that remembers the holder
-- gives without asking, and the truer one after the window ends.
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  return {'ALREADY', held, state[5]}
end
local now = tonumber(ARGV[2])
if now < tonumber(state[3]) or now >= tonumber(state[4]) then
  return {'NOT_ISSUABLE'}
end
local seat = redis.call('LPOP', KEYS[3])
if not seat then
  local next_seat = tonumber(state[2])
  if next_seat > tonumber(state[1]) then
    return {'SOLD_OUT'}
  end
  seat = tostring(next_seat)
  redis.call('HINCRBY', KEYS[1], 'next', 1)
end
local holder = seat .. ':' .. ARGV[2]
redis.call('HSET', KEYS[2], ARGV[1], holder)
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return {'OK', seat, holder, state[5]}
