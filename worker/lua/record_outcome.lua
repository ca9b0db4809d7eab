-- Record an image's final outcome unless one is recorded already, update the job's counts,
-- tell whether the partial-success rule can still be met, and announce it, in one step.
-- KEYS[1] the job's outcomes hash, KEYS[2] the job's counts hash, KEYS[3] the job's meta hash,
-- KEYS[4] the job's event stream, KEYS[5] the deadlines sorted set
-- ARGV[1] image key, ARGV[2] outcome (JSON), ARGV[3] '1' if made, ARGV[4] image type
-- ('scene' | 'character'), ARGV[5] TTL (s), ARGV[6] the job's channel, ARGV[7] job id,
-- ARGV[8] seconds the chord has to finalize a job whose every image has an outcome,
-- ARGV[9..] events to announce; their "completed_images" and "progress" are filled in here, so counts reach
-- subscribers in the order outcomes landed.
-- Returns {1, outcome, doomed_now, last} when recorded, {0, outcome on record, doomed_now, last}
-- otherwise; doomed_now is the reason ('scenes' | 'characters' | 'half') when this image's outcome
-- is the one that made the job unable to pass, else 0: the same answer when the call runs again
-- (a command retried after its reply was lost, a pipeline re-sent), so the early stop is not
-- lost. last is 1 when it is the job's last outcome, else 0: the same again on a repeat.
local images, counts, meta, stream, deadlines = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local image, outcome, ok, kind, ttl, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  tonumber(ARGV[5]), ARGV[6]
if redis.call('HSETNX', images, image, outcome) == 0 then
  local marks = redis.call('HMGET', meta, 'doomed', 'doomed_by', 'last_by')
  local again, again_last = 0, 0
  if marks[1] and marks[2] == image then again = marks[1] end
  if marks[3] == image then again_last = 1 end
  return {0, redis.call('HGET', images, image), again, again_last}
end
local finished = redis.call('HINCRBY', counts, 'finished', 1)
local succeeded = tonumber(redis.call('HGET', counts, 'succeeded') or '0')
if ok == '1' then
  succeeded = redis.call('HINCRBY', counts, 'succeeded', 1)
else
  redis.call('HINCRBY', counts, 'failed_' .. kind, 1)
end
redis.call('EXPIRE', images, ttl)
redis.call('EXPIRE', counts, ttl)

local plan = redis.call('HMGET', meta, 'total_images', 'scenes', 'characters')
local total, scenes, characters = tonumber(plan[1]), tonumber(plan[2]), tonumber(plan[3])
local doomed_now = 0
if ok ~= '1' and total and scenes and characters and succeeded < total then
  local failed = finished - succeeded
  local reason = nil
  if tonumber(redis.call('HGET', counts, 'failed_scene') or '0') >= scenes then
    reason = 'scenes'
  elseif tonumber(redis.call('HGET', counts, 'failed_character') or '0') >= characters then
    reason = 'characters'
  elseif (total - failed) * 2 < total then
    reason = 'half'
  end
  if reason and redis.call('HSETNX', meta, 'doomed', reason) == 1 then
    redis.call('HSET', meta, 'doomed_by', image)
    doomed_now = reason
  end
end

-- The last outcome: its own task ends the job at once, and the chord's callback again (a no-op
-- then). Should neither come (its count lost in a Redis failover, its message lost), the job's
-- deadline, brought forward here, finalizes it instead. XX: a job already finalized has no
-- deadline left to move.
local last = 0
if total and finished >= total then
  redis.call('ZADD', deadlines, 'XX', 'LT', server_now() + tonumber(ARGV[8]), ARGV[7])
  if finished == total then
    last = 1
    redis.call('HSET', meta, 'last_by', image)
  end
end

for i = 9, #ARGV do
  local event = cjson.decode(ARGV[i])
  if event.data.completed_images ~= nil then event.data.completed_images = succeeded end
  if event.data.progress ~= nil then
    event.data.progress = math.min(100, math.floor(finished * 100 / (total or finished)))
  end
  announce(stream, channel, cjson.encode(event))
end
return {1, outcome, doomed_now, last}
