-- Swaps in a day's ranking rebuilt from Postgres, keeping the payments the rebuild's snapshot did
-- not see (follows snapshot.lua).
-- KEYS[1] day bucket, KEYS[2] its snapshot, KEYS[3] the payments counted since (see rank_bump),
-- KEYS[4] the rebuilt counts (zset written by the job; may not exist when nothing sold).
-- ARGV[1] expiry (seconds), ARGV[2] the snapshot the counts were read in.
-- Returns the number of payments carried over, or -1 (nothing changed) if the bucket was already
-- rebuilt from a later snapshot.
local new = parse_snapshot(ARGV[2])
local current = redis.call('GET', KEYS[2])
if current and not includes(new, parse_snapshot(current)) then
  redis.call('DEL', KEYS[4])
  return -1
end
local counted = redis.call('HGETALL', KEYS[3])
local carried = 0
for i = 1, #counted, 2 do
  local xid, items = string.match(counted[i + 1], '^(%d+) ?(.*)$')
  if sees(new, xid) then
    -- In the rebuilt counts already; a late repeat of its bump is refused by the snapshot.
    redis.call('HDEL', KEYS[3], counted[i])
  else
    -- Committed after the snapshot: only its bump counted it, and it stays counted.
    for product, qty in string.gmatch(items, '(%d+) (%-?%d+)') do
      redis.call('ZINCRBY', KEYS[4], qty, product)
    end
    carried = carried + 1
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
else
  redis.call('DEL', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return carried
