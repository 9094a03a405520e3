-- Applies a coupon's changed terms (total, issue window) to its loaded gate, atomically, under
-- the coupon's rebuild lock (so no rebuild that read Postgres before the change can install the
-- old terms after it). The issue script reads total and window on every call, so the next
-- request on any replica decides by the new terms.
--
-- A higher total adds exactly the new seats: fresh seats run up to the total, and
-- holders + seats left = total keeps holding. A lower total is not applied here: seats beyond
-- it may be held or free, and only a rebuild from Postgres (which renumbered them) lays them
-- out again.
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free, KEYS[4] pending, KEYS[5] lock
-- ARGV[1] lock token, ARGV[2] total, ARGV[3] starts (ms), ARGV[4] ends (ms),
-- ARGV[5] expire at (ms), ARGV[6] now (ms)
-- Returns 1 applied, 0 not loaded (the next rebuild reads the new terms), 2 lowered (rebuild
-- needed), -1 the lock is not ours.
if redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return -1
end
local total = redis.call('HGET', KEYS[1], 'total')
if not total then
  return 0
end
if tonumber(ARGV[2]) < tonumber(total) then
  return 2
end
redis.call('HSET', KEYS[1], 'total', ARGV[2], 'starts', ARGV[3], 'ends', ARGV[4])
-- A later window end keeps the gate alive longer; an earlier one leaves the expiry as it is.
local wanted = tonumber(ARGV[5]) - tonumber(ARGV[6])
for i = 1, 4 do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl >= 0 and ttl < wanted then
    redis.call('PEXPIREAT', KEYS[i], ARGV[5])
  end
end
return 1
