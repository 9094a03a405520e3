-- Stock came back: drops the sold-out markers and remembers the generation of each increase,
-- so a late marker from an order that read an older generation is refused.
-- KEYS[2i-1] marker, KEYS[2i] restocked of product i
-- ARGV[i] stock generation after product i's increase, ARGV[#ARGV] how long to remember (ms)
local keep = ARGV[#ARGV]
for i = 1, #ARGV - 1 do
  local marker, restocked = KEYS[2 * i - 1], KEYS[2 * i]
  local known = tonumber(redis.call('GET', restocked) or '-1')
  if tonumber(ARGV[i]) > known then
    redis.call('SET', restocked, ARGV[i], 'PX', keep)
  end
  redis.call('DEL', marker)
end
return 1
