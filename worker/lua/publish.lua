-- Publish one event, once: the same call run again (a command retried after its reply was
-- lost) finds its request's mark and announces nothing a second time.
-- KEYS[1] the job's event stream, KEYS[2] this request's mark (JobKeys.sent)
-- ARGV[1] the job's pub/sub channel, ARGV[2] the encoded event, ARGV[3] how long the mark is
-- kept (s)
-- Returns 1 when announced, 0 when this request had been already.
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[3])) then return 0 end
announce(KEYS[1], ARGV[1], ARGV[2])
return 1
