-- Record what the provider billed for one paid call of an image, once: the charge is keyed by
-- the image and the provider's reference for the call (a prediction id), so a resumed or
-- redelivered call is never counted twice. Drops the image's reservation either way (a
-- delivery that resumed a call charged before reserved again).
-- KEYS[1] the job's ledger hash, KEYS[2] its reservations hash, KEYS[3] its charges hash
-- ARGV[1] image key, ARGV[2] the call's reference, ARGV[3] cost (nano $), ARGV[4] TTL (s)
-- Returns the cost on record for that call.
local ledger, reservations, charges = KEYS[1], KEYS[2], KEYS[3]
local image, ttl = ARGV[1], tonumber(ARGV[4])
local held = redis.call('HGET', reservations, image)
if held then
  redis.call('HDEL', reservations, image)
  redis.call('HINCRBY', ledger, 'reserved', -tonumber(held))
end
local field = image .. '|' .. ARGV[2]
local existing = redis.call('HGET', charges, field)
if existing then return tonumber(existing) end
redis.call('HSET', charges, field, ARGV[3])
redis.call('HINCRBY', ledger, 'spent', tonumber(ARGV[3]))
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return tonumber(ARGV[3])
