-- Record the intent to create a prediction, unless the job's predictions were cancelled.
-- KEYS[1]  the job's prediction checkpoints (hash)
-- ARGV[1]  field prefix: "{image_key}#{attempt}"
-- ARGV[2]  TTL of the hash, seconds
-- Returns the intent's time (unix seconds, this server's clock) as a string, or false.
if redis.call('HEXISTS', KEYS[1], '#cancelled') == 1 then return false end
local at = string.format('%.6f', server_now())
redis.call('HSET', KEYS[1], ARGV[1] .. ':intent', at)
redis.call('HDEL', KEYS[1], ARGV[1] .. ':id')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return at
