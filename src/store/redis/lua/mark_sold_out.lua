-- Marks a product sold out, unless its stock came back after the refused order looked at it.
-- KEYS[1] marker, KEYS[2] restocked (the last stock generation that increased the stock)
-- ARGV[1] stock generation the refused order read, ARGV[2] marker TTL (ms)
-- Returns 1 when marked.
local restocked = tonumber(redis.call('GET', KEYS[2]) or '-1')
if restocked > tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
