-- Drop an image's reservation when its paid call did not happen.
-- KEYS[1] the job's ledger hash, KEYS[2] its reservations hash
-- ARGV[1] image key
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
end
return 0
