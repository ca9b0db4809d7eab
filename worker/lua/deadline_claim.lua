-- The watchdog claims jobs past their deadline. A claimed deadline is pushed out by a hold, not
-- removed: it is removed only once the job's result is stored, so a watchdog that dies while
-- finalizing leaves the job to the next one.
-- KEYS[1] the deadlines sorted set (job id -> due time, server clock), KEYS[2] this request's
-- reply (c.claim_reply: the same call run again after its reply was lost answers the same)
-- ARGV[1] most jobs to claim, ARGV[2] seconds the claim holds
-- Returns the job ids claimed.
local earlier = redis.call('GET', KEYS[2])
if earlier then return cjson.decode(earlier) end
local now = server_now()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), id)
end
if #ids > 0 then
  redis.call('SET', KEYS[2], cjson.encode(ids), 'EX', math.max(1, math.ceil(tonumber(ARGV[2]))))
end
return ids
