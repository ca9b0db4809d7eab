-- Note one job in the index of recent jobs (note_job in the prelude).
-- KEYS[1] the index (sorted set), KEYS[2] the summaries (hash)
-- ARGV[1] job id, ARGV[2] the fields to merge (JSON object), ARGV[3] the field stamped with the
-- server's time (started_at | finished_at), ARGV[4] most jobs kept, ARGV[5] seconds kept
note_job(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
