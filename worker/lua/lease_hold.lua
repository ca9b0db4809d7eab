-- A delivery takes (or takes over) its task's lease: the lease now belongs to this delivery's
-- token alone, and carries the message to send again if the delivery is lost.
-- KEYS[1] the leases sorted set (task id -> expiry, server clock), KEYS[2] the lease records
-- hash (task id -> "<token> <payload JSON>")
-- ARGV[1] task id, ARGV[2] token, ARGV[3] payload (JSON), ARGV[4] seconds until it expires
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[1], server_now() + tonumber(ARGV[4]), ARGV[1])
return 1
