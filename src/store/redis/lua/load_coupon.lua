-- Installs a coupon's state rebuilt from Postgres. The holders and free seats were written to
-- temporary keys beforehand (in chunks, so a large coupon does not block Redis); this script
-- swaps them in atomically, so a request sees either the old state or the whole new one.
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free, KEYS[4] lock,
-- KEYS[5] staged holders, KEYS[6] staged free, KEYS[7] pending
-- Every installed holder comes from a Postgres row, so nothing is pending after a load.
-- ARGV[1] lock token, ARGV[2] mode ("absent": only if not loaded; "replace"),
-- ARGV[3] total, ARGV[4] next, ARGV[5] starts, ARGV[6] ends, ARGV[7] gen, ARGV[8] expire at (ms)
-- Returns 1 when installed, 0 when not (lock lost, or already loaded in "absent" mode).
local function drop_staged()
  -- UNLINK: staged holders of a large coupon are freed in the background.
  redis.call('UNLINK', KEYS[5], KEYS[6])
end
if redis.call('GET', KEYS[4]) ~= ARGV[1] then
  drop_staged()
  return 0
end
if ARGV[2] == 'absent' and redis.call('HEXISTS', KEYS[1], 'total') == 1 then
  drop_staged()
  return 0
end
-- UNLINK: a large holders hash is freed in the background instead of blocking Redis.
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[7])
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[2])
end
if redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('RENAME', KEYS[6], KEYS[3])
end
-- A sentinel field keeps the holders hash (and its expiry) alive while no one holds a coupon.
redis.call('HSET', KEYS[2], '_', '0')
redis.call('ZADD', KEYS[7], '+inf', '_')
redis.call('HSET', KEYS[1], 'total', ARGV[3], 'next', ARGV[4], 'starts', ARGV[5],
  'ends', ARGV[6], 'gen', ARGV[7])
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[7]}) do
  redis.call('PEXPIREAT', key, ARGV[8])
end
return 1
