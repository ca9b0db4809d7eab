-- A worker says it is alive (worker/presence.py): its last beat, on the server's clock. Workers
-- silent for longer than the window are forgotten, so the set stays as small as the fleet.
-- KEYS[1] the sorted set: worker name -> unix seconds of its last beat
-- ARGV[1] the worker's name, ARGV[2] seconds after which a silent worker is forgotten
local now = server_now()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
