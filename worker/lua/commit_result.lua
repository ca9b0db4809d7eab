-- Commit a job's result once, with everything that must happen exactly once with it: the final
-- stage_update, the retention schedule and the cluster's job metrics. A finalize that finds a
-- result committed gets that result back and changes nothing.
-- KEYS[1] the job's result, KEYS[2] the job's meta hash, KEYS[3] the job's event stream,
-- KEYS[4] the retention index, KEYS[5] the metrics hash, KEYS[6] the index of recent jobs,
-- KEYS[7] its summaries
-- ARGV[1] result (JSON; "null" for text-only), ARGV[2] TTL of the result (s),
-- ARGV[3] the job's channel, ARGV[4] the final stage_update (its total_time is filled in here
-- from the server's clock), ARGV[5] job id, ARGV[6] seconds to keep the job's objects,
-- ARGV[7] outcome label, ARGV[8] images made, ARGV[9] images failed, ARGV[10] cost (nano $),
-- ARGV[11] this finalize's request id, ARGV[12..] duration bucket bounds (s)
-- Returns {1, result} when this call committed, {0, committed result} otherwise. The same
-- request run again (its reply lost, its pipeline sent again) answers {1, result} again, so its
-- finalize still logs the job's end; it changes nothing the second time.
local existing = redis.call('GET', KEYS[1])
if existing then
  if redis.call('HGET', KEYS[2], 'committed_by') == ARGV[11] then return {1, existing} end
  return {0, existing}
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[2], 'committed_by', ARGV[11])
-- A job whose meta is gone (expired, or never written) must not get one that never expires.
if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2])) end
local now = server_now()
local started = tonumber(redis.call('HGET', KEYS[2], 'started_at') or '')
local duration = 0
if started then duration = math.max(0, now - started) end
duration = math.floor(duration * 1000 + 0.5) / 1000

local final = cjson.decode(ARGV[4])
final.data.total_time = duration
announce(KEYS[3], ARGV[3], cjson.encode(final))
local d = final.data
local row = cjson.encode({status = d.result_status, total_images = d.total_images,
  successful_images = d.successful_images, failed_images = d.failed_images,
  total_cost = d.total_cost, total_time = d.total_time})
note_job(KEYS[6], KEYS[7], ARGV[5], row, 'finished_at', @JOB_INDEX_MAX_ENTRIES@,
  @JOB_INDEX_TTL_S@)

redis.call('ZADD', KEYS[4], now + tonumber(ARGV[6]), ARGV[5])
local metrics = KEYS[5]
redis.call('HINCRBY', metrics, 'jobs:' .. ARGV[7], 1)
redis.call('HINCRBY', metrics, 'images:made', tonumber(ARGV[8]))
redis.call('HINCRBY', metrics, 'images:failed', tonumber(ARGV[9]))
redis.call('HINCRBY', metrics, 'cost:nano', tonumber(ARGV[10]))
redis.call('HINCRBYFLOAT', metrics, 'duration:sum', duration)
redis.call('HINCRBY', metrics, 'duration:count', 1)
for i = 12, #ARGV do
  if duration <= tonumber(ARGV[i]) then
    redis.call('HINCRBY', metrics, 'duration:le:' .. ARGV[i], 1)
  end
end
return {1, ARGV[1]}
