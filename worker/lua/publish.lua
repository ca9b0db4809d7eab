-- Publish one event.
-- KEYS[1] the job's event stream
-- ARGV[1] the job's pub/sub channel, ARGV[2] the encoded event
announce(KEYS[1], ARGV[1], ARGV[2])
return 0
