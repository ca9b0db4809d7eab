-- Hold an image's share of the budget before its paid call: atomic, so that two workers racing
-- for the last dollars cannot both win. Idempotent per image while the hold stands.
-- KEYS[1] the job's ledger hash (limit, spent, reserved), KEYS[2] its reservations hash,
-- KEYS[3] (optional) a key that must hold ARGV[4]: the image's lock and this delivery's token,
-- so that a delivery whose lock was taken over holds nothing, and pays nothing after it
-- ARGV[1] image key, ARGV[2] amount (nano $), ARGV[3] TTL (s), ARGV[4] the lock's token
-- Returns {1, spent, reserved} when held, {0, spent, reserved} when over the limit,
-- {-1, spent, reserved} when KEYS[3] does not hold ARGV[4] (nothing held).
local ledger, reservations = KEYS[1], KEYS[2]
local image, amount, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local spent = tonumber(redis.call('HGET', ledger, 'spent') or '0')
local reserved = tonumber(redis.call('HGET', ledger, 'reserved') or '0')
if KEYS[3] and redis.call('GET', KEYS[3]) ~= ARGV[4] then
  return {-1, spent, reserved}
end
if redis.call('HEXISTS', reservations, image) == 1 then
  return {1, spent, reserved}
end
local limit = redis.call('HGET', ledger, 'limit')
if limit and spent + reserved + amount > tonumber(limit) then
  return {0, spent, reserved}
end
redis.call('HSET', reservations, image, amount)
redis.call('HINCRBY', ledger, 'reserved', amount)
redis.call('EXPIRE', ledger, ttl)
redis.call('EXPIRE', reservations, ttl)
return {1, spent, reserved + amount}
