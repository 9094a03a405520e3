-- Adds paid quantities to one day's ranking and keeps the bucket's expiry, in one step.
-- KEYS[1] day bucket; ARGV[1] expiry (seconds); ARGV[2], ARGV[3], ... product id, quantity pairs.
for i = 2, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
