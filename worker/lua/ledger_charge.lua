-- Record what the provider billed for one paid call of an image, once: the charge is keyed by
-- the image and the provider's reference for the call (a prediction id), so a resumed or
-- redelivered call is never counted twice. Drops the image's reservation either way (a
-- delivery that resumed a call charged before reserved again). With a note, the image is also
-- noted as made (paid for, not yet stored) in the same step.
-- KEYS[1] the job's ledger hash, KEYS[2] its reservations hash, KEYS[3] its charges hash,
-- KEYS[4] the job's made-images hash
-- ARGV[1] image key, ARGV[2] the call's reference, ARGV[3] cost (nano $), ARGV[4] TTL (s),
-- ARGV[5] the made note (JSON), or '' for none
-- Returns the image's cost on record, all its paid calls together (nano $).
local ledger, reservations, charges = KEYS[1], KEYS[2], KEYS[3]
local image, ttl = ARGV[1], tonumber(ARGV[4])
local held = redis.call('HGET', reservations, image)
if held then
  redis.call('HDEL', reservations, image)
  redis.call('HINCRBY', ledger, 'reserved', -tonumber(held))
end
local field = image .. '|' .. ARGV[2]
if redis.call('HSETNX', charges, field, ARGV[3]) == 1 then
  redis.call('HINCRBY', ledger, 'spent', tonumber(ARGV[3]))
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], image, ARGV[5])
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
local total = 0
local prefix = image .. '|'
local all = redis.call('HGETALL', charges)
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #prefix) == prefix then total = total + tonumber(all[i + 1]) end
end
return total
