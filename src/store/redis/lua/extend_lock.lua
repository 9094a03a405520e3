-- Keeps a long rebuild's lock (and what it has staged so far) alive, if the lock is still
-- ours: a rebuild of a large coupon may take longer than the lock's first TTL.
-- KEYS[1] lock, KEYS[2..] staged keys; ARGV[1] token, ARGV[2] lock TTL (ms), ARGV[3] staged
-- keys' TTL (ms)
-- Returns 1 when extended, 0 when the lock is someone else's (or gone).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
for i = 2, #KEYS do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return 1
