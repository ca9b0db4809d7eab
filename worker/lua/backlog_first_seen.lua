-- When each of these messages was first seen at the head of its list, on the server's clock,
-- for the messages that carry no send time (worker/backlog.py). Forgets every message it is not
-- given: only the current heads are kept, so the hash stays as small as the number of lists.
-- KEYS[1] the hash: delivery tag -> unix seconds first seen
-- ARGV[1..] the delivery tags of the heads now
-- Returns the first-seen times, in ARGV's order (as strings).
local now = server_now()
local seen = {}
local wanted = {}
for i = 1, #ARGV do
  redis.call('HSETNX', KEYS[1], ARGV[i], string.format('%.6f', now))
  seen[i] = redis.call('HGET', KEYS[1], ARGV[i])
  wanted[ARGV[i]] = true
end
for _, tag in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not wanted[tag] then redis.call('HDEL', KEYS[1], tag) end
end
redis.call('EXPIRE', KEYS[1], 86400)
return seen
