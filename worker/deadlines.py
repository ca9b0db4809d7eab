"""Job deadlines: every job ends with a finalize, even if one of its images is lost for good.

A job's deadline is put in a Redis sorted set when it starts and taken out when it finishes.
The watchdog that renews leases also claims due deadlines (atomically, once across workers)
and finalizes those jobs with what exists.
"""

from __future__ import annotations

import time

import redis

DEADLINES = "refgen:deadlines"  # sorted set: job id → due time (unix seconds)

_CLAIM_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then table.insert(claimed, id) end
end
return claimed
"""


class JobDeadlines:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._claim = client.register_script(_CLAIM_DUE)

    def schedule(self, job_id: str, seconds_from_now: float) -> None:
        # NX: a redelivered start keeps the first deadline.
        self._redis.zadd(DEADLINES, {job_id: time.time() + seconds_from_now}, nx=True)

    def cancel(self, job_id: str) -> None:
        self._redis.zrem(DEADLINES, job_id)

    def claim_due(self, limit: int = 50) -> list[str]:
        return [str(j) for j in self._claim(keys=[DEADLINES], args=[time.time(), limit])]

    def due_at(self, job_id: str) -> float | None:
        score = self._redis.zscore(DEADLINES, job_id)
        return float(score) if score is not None else None
