-- Record a job's plan, schedule its deadline and announce "started", once, in one step: a
-- start that dies half-way can never leave a planned job without a deadline.
-- KEYS[1] the job's meta hash, KEYS[2] the deadlines sorted set, KEYS[3] the job's event stream,
-- KEYS[4] the index of recent jobs, KEYS[5] its summaries, KEYS[6] (optional) the result
-- stored under the job id (a refused earlier send's null)
-- ARGV[1] job id, ARGV[2] total images, ARGV[3] scenes, ARGV[4] characters,
-- ARGV[5] the planned images (JSON), ARGV[6] TTL of the meta hash (s),
-- ARGV[7] seconds until the job's deadline, ARGV[8] the job's channel, ARGV[9] "started" event,
-- ARGV[10] who begins it (the start's task id; "" for none)
-- Returns 1 when this call began the job (or a call by the same ARGV[10] did: the same call run
-- again after its reply was lost answers the same), 0 when an earlier delivery had, -1
-- (writing nothing) when the job was cancelled before it began (worker/cancel.py).
if redis.call('HGET', KEYS[1], 'doomed') == 'cancelled'
    and redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  return -1
end
local now = server_now()
if redis.call('HSETNX', KEYS[1], 'started_at', string.format('%.6f', now)) == 0 then
  local by = ARGV[10] or ''
  if by ~= '' and redis.call('HGET', KEYS[1], 'begun_by') == by then return 1 end
  return 0
end
redis.call('HSET', KEYS[1], 'total_images', ARGV[2], 'scenes', ARGV[3],
  'characters', ARGV[4], 'images', ARGV[5], 'begun_by', ARGV[10] or '')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
redis.call('ZADD', KEYS[2], 'NX', now + tonumber(ARGV[7]), ARGV[1])
-- A refused earlier send of this job id left its events and its null result: this run's
-- history starts here, and its readers wait for its own result. In this same step, so that no
-- crash can leave the job begun and the null still readable.
redis.call('DEL', KEYS[3])
if KEYS[6] then redis.call('DEL', KEYS[6]) end
announce(KEYS[3], ARGV[8], ARGV[9])
local row = cjson.encode({status = 'running', total_images = tonumber(ARGV[2]),
  finished_at = cjson.null})
note_job(KEYS[4], KEYS[5], ARGV[1], row, 'started_at', @JOB_INDEX_MAX_ENTRIES@,
  @JOB_INDEX_TTL_S@)
return 1
