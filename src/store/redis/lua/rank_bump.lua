-- Counts one committed payment (or refund: negative quantities) in its day's ranking, at most
-- once (follows snapshot.lua).
-- KEYS[1] day bucket (zset), KEYS[2] the snapshot the bucket was last rebuilt from,
-- KEYS[3] the payments counted since then (hash: payment id, or 'r' and a refund id ->
-- 'xid product qty product qty ...').
-- ARGV[1] expiry (seconds), ARGV[2] payment id ('r<id>' for a refund), ARGV[3] its transaction
-- id, ARGV[4] its items ('product qty product qty ...', qty negative for a refund).
-- Returns 1 if counted, 0 if the bucket already holds it (rebuilt from a snapshot that saw it,
-- or counted by an earlier call for the same payment).
local rebuilt_from = redis.call('GET', KEYS[2])
if rebuilt_from and sees(parse_snapshot(rebuilt_from), ARGV[3]) then
  return 0
end
if redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3] .. ' ' .. ARGV[4]) == 0 then
  return 0
end
for product, qty in string.gmatch(ARGV[4], '(%d+) (%-?%d+)') do
  redis.call('ZINCRBY', KEYS[1], qty, product)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 1
