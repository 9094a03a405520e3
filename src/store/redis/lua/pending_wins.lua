-- Reads one bounded chunk of the wins pending longer than the grace, with their holder
-- values, for the reconciliation job to check against Postgres.
--
-- KEYS[1] state, KEYS[2] holders, KEYS[3] free (unused: every gate script takes the same keys),
-- KEYS[4] pending
-- ARGV[1] won at or before this (ms), ARGV[2] at most this many
-- Returns {gen, user, holder value or false, user, holder value or false, ...} or {} when not
-- loaded.
local gen = redis.call('HGET', KEYS[1], 'gen')
if not gen then
  return {}
end
local users = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local reply = {gen}
for _, user in ipairs(users) do
  reply[#reply + 1] = user
  reply[#reply + 1] = redis.call('HGET', KEYS[2], user) or ''
end
return reply
