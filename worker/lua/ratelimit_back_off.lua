-- Hold every worker's requests of one kind for a while (after a 429).
-- KEYS[1]  the back-off (unix ms until which nobody is admitted)
-- ARGV[1]  how long, ms; a back-off already set for longer is kept
local until_ms = math.floor(server_now() * 1000) + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 0
