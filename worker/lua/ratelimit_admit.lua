-- Admit one request under a sliding-window limit, unless a back-off holds everyone.
-- KEYS[1]  the window's log (sorted set of admissions, scored by unix ms)
-- KEYS[2]  the back-off (unix ms until which nobody is admitted)
-- ARGV[1]  the limit: admissions in any window
-- ARGV[2]  the window, ms
-- ARGV[3]  a unique member for this admission
-- Returns 0 when admitted, otherwise the ms to wait before asking again. The same member run
-- again (its reply lost) while its slot is in the window is admitted again, in that slot,
-- whatever the window or a back-off now say: told to wait, its request would take a second
-- slot when it asked again. Run again later, its slot has lapsed: it is a new admission, for
-- the request that follows now.
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 0 end
local now_ms = math.floor(server_now() * 1000)
local limit, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local until_ms = tonumber(redis.call('GET', KEYS[2]) or '0')
if until_ms > now_ms then return until_ms - now_ms end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window_ms)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window_ms * 2)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window_ms - now_ms + 1)
