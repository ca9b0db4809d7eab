-- Hold every worker's requests of one kind for a while (after a 429), once per request: the
-- same call run again (a command sent again after a timeout) finds its mark and does not push
-- the back-off later than the 429 asked.
-- KEYS[1]  the back-off (unix ms until which nobody is admitted)
-- KEYS[2]  this request's mark
-- ARGV[1]  how long, ms; a back-off already set for longer is kept
-- Returns 1 when applied, 0 when this request had been already.
-- The mark outlives the back-off: redis-py sends a command again after its 30 s socket
-- timeout, up to 20 times.
local mark_ms = math.max(tonumber(ARGV[1]) + 1000, 600000)
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', mark_ms) then return 0 end
local until_ms = math.floor(server_now() * 1000) + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 1
