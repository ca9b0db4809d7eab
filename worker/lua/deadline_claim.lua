-- The watchdog claims jobs past their deadline. A claimed deadline is pushed out by a hold, not
-- removed: it is removed only once the job's result is stored, so a watchdog that dies while
-- finalizing leaves the job to the next one.
-- KEYS[1] the deadlines sorted set (job id -> due time, server clock)
-- ARGV[1] most jobs to claim, ARGV[2] seconds the claim holds
-- Returns the job ids claimed.
local now = server_now()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), id)
end
return ids
