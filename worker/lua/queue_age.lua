-- Aging: the images waiting at a priority level rise one level once the message next to be
-- served there has waited at the head of its list for ARGV[1] seconds (server clock): nothing
-- of that level was served meanwhile, so the whole level moves up, ahead of what waits in the
-- level above. A large job under an endless stream of smaller ones climbs a level per period
-- and is served within (levels × period) instead of only at its deadline (worker/fairness.py).
-- Level 0 (start, finalize, retries) is never joined: level 1 is as high as an image rises.
-- kombu's Redis transport pushes on the left and pops on the right: the head is the right end.
-- KEYS[1] the hash "<level>:<delivery tag>" -> unix seconds first seen at the head (server clock)
-- KEYS[2..] the queue's lists by level, from level 1 to the lowest
-- ARGV[1] seconds at a head before its level rises, ARGV[2] most messages moved in one call
-- Returns the number of messages moved.
local now = server_now()
local period, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local heads = {}
local moved = 0
for i = 3, #KEYS do
  local list, above = KEYS[i], KEYS[i - 1]
  local head = redis.call('LINDEX', list, -1)
  local tag = nil
  if head then
    local ok, message = pcall(cjson.decode, head)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      tag = message.properties.delivery_tag
    end
  end
  if tag then
    local field = (i - 1) .. ':' .. tostring(tag)
    redis.call('HSETNX', KEYS[1], field, string.format('%.6f', now))
    if now - tonumber(redis.call('HGET', KEYS[1], field)) >= period and moved < most then
      local taken = {}
      while moved < most do
        local m = redis.call('RPOP', list)
        if not m then break end
        table.insert(taken, m)
        moved = moved + 1
      end
      -- The oldest pushed last: it is the first served at its new level, the order kept.
      for j = #taken, 1, -1 do redis.call('RPUSH', above, taken[j]) end
    else
      heads[field] = true
    end
  end
end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not heads[field] then redis.call('HDEL', KEYS[1], field) end
end
redis.call('EXPIRE', KEYS[1], 86400)
return moved
