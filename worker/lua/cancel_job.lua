-- Cancel a job, once, and say what state it was in (worker/cancel.py). From here on the job
-- stops paying: its images read the mark before each paid call (`doomed` = 'cancelled'), and a
-- start that has not begun it yet cannot begin it (begin_job.lua).
-- KEYS[1] the job's meta hash, KEYS[2] the job's claim, KEYS[3] the job's committed result
-- ARGV[1] the reason, ARGV[2] this cancel request's id, ARGV[3] TTL of the job's keys (s),
-- ARGV[4] the claim a cancel takes on a job nothing has claimed ("cancel:<request id>")
-- Returns {state, detail}:
--   {'finished', ''}     its result is committed: nothing changes
--   {'again', by}        cancelled before, by another request (its id)
--   {'stopping', why}    it can no longer pass and is already stopping (why: the doom reason)
--   {'running', ''}      cancelled now; it had begun
--   {'before_start', ''} cancelled now; nothing had claimed it: it will never start
--   {'starting', ''}     cancelled now; a start holds it and has not begun it: that start ends it
-- The same request delivered again finds its own mark and carries on as the first time.
local meta, claim = KEYS[1], KEYS[2]
local doom = redis.call('HGET', meta, 'doomed')
if doom == 'cancelled' then
  local by = redis.call('HGET', meta, 'cancelled_by') or ''
  if by ~= ARGV[2] then return {'again', by} end
elseif redis.call('EXISTS', KEYS[3]) == 1 then
  return {'finished', ''}
elseif doom then
  return {'stopping', doom}
else
  redis.call('HSET', meta, 'doomed', 'cancelled', 'cancel_reason', ARGV[1],
    'cancelled_by', ARGV[2])
  redis.call('EXPIRE', meta, tonumber(ARGV[3]))
end
if redis.call('HEXISTS', meta, 'started_at') == 1 then return {'running', ''} end
if redis.call('SET', claim, ARGV[4], 'NX', 'EX', tonumber(ARGV[3]))
    or redis.call('GET', claim) == ARGV[4] then
  return {'before_start', ''}
end
return {'starting', ''}
