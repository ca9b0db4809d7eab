"""One limit on Replicate prediction creates for every worker on every machine.

A sliding-window log in Redis: at most ``limit`` creates in any window of ``window_s``,
admitted by a Lua script on the server's clock, so two workers can never both take the last
slot. A 429 from Replicate sets a shared back-off that holds everyone, so adding workers never
turns into a storm of 429s. Admissions are spaced by a small guard added to the window, so the
limit still holds where Replicate counts, after network jitter.
"""

from __future__ import annotations

import time
import uuid

import redis
import structlog

from worker.errors import RateLimitedError

log = structlog.get_logger(__name__)

CREATES = "refgen:ratelimit:replicate:creates"
BACKOFF = "refgen:ratelimit:replicate:backoff"

_ADMIT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local limit, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local until_ms = tonumber(redis.call('GET', KEYS[2]) or '0')
if until_ms > now_ms then return until_ms - now_ms end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - window_ms)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window_ms * 2)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window_ms - now_ms + 1)
"""

_BACK_OFF = """
local now = redis.call('TIME')
local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 0
"""


class RedisRateGate:
    def __init__(
        self, client: redis.Redis, *, limit: int, window_s: float = 1.0, guard_s: float = 0.05
    ) -> None:
        self._redis = client
        self._limit = limit
        self._window_ms = int((window_s + guard_s) * 1000)
        self._admit = client.register_script(_ADMIT)
        self._back_off = client.register_script(_BACK_OFF)

    def acquire(self, deadline_s: float) -> None:
        """Wait for a slot. Raises ``RateLimitedError`` (retryable) when none comes in time."""
        give_up = time.monotonic() + deadline_s
        waited = 0.0
        while True:
            wait_ms = int(
                self._admit(
                    keys=[CREATES, BACKOFF], args=[self._limit, self._window_ms, uuid.uuid4().hex]
                )
            )
            if wait_ms <= 0:
                if waited > 1.0:
                    log.info("rate_limit_waited", seconds=round(waited, 2))
                return
            pause = min(wait_ms / 1000, 1.0)
            if time.monotonic() + pause > give_up:
                raise RateLimitedError(
                    "Waited too long for the shared Replicate rate limit",
                    retry_after_s=wait_ms / 1000,
                )
            time.sleep(pause)
            waited += pause

    def back_off(self, seconds: float) -> None:
        """Hold every worker's creates for ``seconds`` (after a 429)."""
        self._back_off(keys=[BACKOFF], args=[int(seconds * 1000)])
        log.warning("rate_limit_back_off", seconds=seconds)
