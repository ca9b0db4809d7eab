-- Renew the leases a process holds, each only while its token is still the one on record.
-- KEYS[1] the leases sorted set, KEYS[2] the lease records hash
-- ARGV[1] seconds until they expire, ARGV[2..] pairs of task id and token
-- Returns the task ids whose lease is no longer this process's (taken over or released).
local expiry = server_now() + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local record = redis.call('HGET', KEYS[2], id)
  if record and string.sub(record, 1, #token + 1) == token .. ' ' then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
  else
    table.insert(lost, id)
  end
end
return lost
