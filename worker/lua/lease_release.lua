-- A delivery that is done releases its lease, unless another delivery has taken it over.
-- KEYS[1] the leases sorted set, KEYS[2] the lease records hash
-- ARGV[1] task id, ARGV[2] token
-- Returns 1 when released, 0 when the lease was not this token's.
local record = redis.call('HGET', KEYS[2], ARGV[1])
if record and string.sub(record, 1, #ARGV[2] + 1) == ARGV[2] .. ' ' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
