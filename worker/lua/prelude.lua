-- The prelude of every script in this folder (worker/scripts.py puts it in front of each):
-- two local functions, and no KEYS or ARGV of its own.
--
-- announce(stream, channel, message): the one way an event leaves Redis.
-- Appends the message to the job's stream and publishes it on the job's channel in one atomic
-- step, so the order a late subscriber replays is the order live subscribers saw. Each message
-- is stamped with the server's clock: ",\"published_at\":<unix s>.<us>" is spliced in as text
-- (cjson would round it).
local function announce(stream, channel, message)
  local now = redis.call('TIME')
  local stamped = string.sub(message, 1, -2) .. ',"published_at":' .. now[1] .. '.'
    .. string.format('%06d', tonumber(now[2])) .. '}'
  redis.call('XADD', stream, 'MAXLEN', '~', @EVENTS_STREAM_MAXLEN@, '*', 'message', stamped)
  redis.call('EXPIRE', stream, @EVENTS_STREAM_TTL_S@)
  redis.call('PUBLISH', channel, stamped)
  return stamped
end

-- server_now(): unix seconds on the Redis server's clock, the one clock every expiry uses.
local function server_now()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
