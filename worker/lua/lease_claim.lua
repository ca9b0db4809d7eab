-- The watchdog claims expired leases: each is taken over by a claim token and given a short
-- hold, but nothing is deleted. If the claimer dies or its re-send fails, the lease expires
-- again and is claimed again: the task is never lost between the claim and the re-send.
-- KEYS[1] the leases sorted set, KEYS[2] the lease records hash, KEYS[3] this request's reply
-- (c.claim_reply: kept while the claims hold, so the same call run again after its reply was
-- lost answers the same, rather than nothing: its claims would wait out their hold)
-- ARGV[1] most leases to claim, ARGV[2] seconds the claim holds, ARGV[3] the claimer's name
-- Returns a flat list: task id, claim token, payload (JSON), for each lease claimed.
local earlier = redis.call('GET', KEYS[3])
if earlier then return cjson.decode(earlier) end
local now = server_now()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local claimed = {}
for i, id in ipairs(ids) do
  local record = redis.call('HGET', KEYS[2], id)
  if record then
    local payload = string.sub(record, string.find(record, ' ', 1, true) + 1)
    local token = ARGV[3] .. ':' .. string.format('%.6f', now) .. ':' .. i
    redis.call('HSET', KEYS[2], id, token .. ' ' .. payload)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    table.insert(claimed, id)
    table.insert(claimed, token)
    table.insert(claimed, payload)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
if #claimed > 0 then
  redis.call('SET', KEYS[3], cjson.encode(claimed), 'EX', math.max(1, math.ceil(tonumber(ARGV[2]))))
end
return claimed
