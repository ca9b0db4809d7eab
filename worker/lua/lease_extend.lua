-- Push a lease's expiry out while its token is still the one on record: the watchdog does this
-- once a claimed task is safely back on the broker (it may wait in the queue a while before a
-- delivery takes the lease over), and a delivery does it when it hands its task to a retry.
-- KEYS[1] the leases sorted set, KEYS[2] the lease records hash
-- ARGV[1] task id, ARGV[2] token, ARGV[3] seconds from now, ARGV[4] '' or the prefix of a
-- holder that is a message on the broker (QUEUED_HOLDER, worker/recovery.py): the token on
-- record then says so from here on, so that the orphan rescue does not take it for a delivery
-- Returns 1 when extended, 0 when the lease was not this token's.
local prefix = ARGV[4] or ''
local record = redis.call('HGET', KEYS[2], ARGV[1])
if record and string.sub(record, 1, #ARGV[2] + 1) == ARGV[2] .. ' ' then
  redis.call('ZADD', KEYS[1], 'XX', server_now() + tonumber(ARGV[3]), ARGV[1])
  if prefix ~= '' and string.sub(ARGV[2], 1, #prefix) ~= prefix then
    redis.call('HSET', KEYS[2], ARGV[1], prefix .. record)
  end
  return 1
end
return 0
