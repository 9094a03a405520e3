-- One call of a user against their rate budget: GCRA (the generic cell rate algorithm), the
-- token bucket kept as one number, the user's theoretical arrival time (TAT).
--
-- KEYS[1]  the user's TAT, in microseconds of the Redis clock
-- ARGV[1]  emission interval: microseconds one call costs (1,000,000 / rate per second)
-- ARGV[2]  burst capacity: microseconds of calls that may be ahead of now (burst * interval)
--
-- Returns 0 when the call is admitted (and charges it), else the microseconds after which it
-- would be (a refused call charges nothing). The clock is Redis's own, so every replica of the
-- service shares one clock and one budget; the key expires once the bucket is full again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local ahead = tat + interval - now
if ahead > capacity then
  return ahead - capacity
end
-- '%.0f': Lua would write a number this large as 1.7e+15, losing the microseconds.
redis.call('SET', KEYS[1], string.format('%.0f', tat + interval), 'PX', math.ceil(ahead / 1000))
return 0
