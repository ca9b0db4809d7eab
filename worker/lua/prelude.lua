-- The prelude of every script in this folder (worker/scripts.py puts it in front of each):
-- its local functions, and no KEYS or ARGV of its own.
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

-- note_job(index, summaries, job_id, fields, stamp, max_entries, ttl): the index of recent
-- jobs the gateway lists (worker/job_index.py). Merges `fields` (a JSON object) into the job's
-- summary, sets `stamp` (started_at | finished_at) to the server's time, and keeps the index
-- bounded: at most `max_entries` jobs, none first seen more than `ttl` seconds ago.
-- index: sorted set of job ids by first seen; summaries: hash, job id -> JSON object.
local function note_job(index, summaries, job_id, fields, stamp, max_entries, ttl)
  local now = server_now()
  local raw = redis.call('HGET', summaries, job_id)
  local summary = {}
  if raw then summary = cjson.decode(raw) end
  for k, v in pairs(cjson.decode(fields)) do summary[k] = v end
  summary[stamp] = now
  redis.call('HSET', summaries, job_id, cjson.encode(summary))
  redis.call('ZADD', index, 'NX', now, job_id)
  local function drop(ids)
    if #ids > 0 then
      redis.call('HDEL', summaries, unpack(ids))
      redis.call('ZREM', index, unpack(ids))
    end
  end
  drop(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. (now - ttl)))
  local excess = redis.call('ZCARD', index) - max_entries
  if excess > 0 then drop(redis.call('ZRANGE', index, 0, excess - 1)) end
  redis.call('EXPIRE', index, ttl)
  redis.call('EXPIRE', summaries, ttl)
end
