"""Leases: how lost work is found in seconds rather than after the broker's visibility timeout.

Every task that runs holds a lease in Redis, renewed by a heartbeat while its process lives. The
lease carries what is needed to send the task again. When a whole worker dies (SIGKILL, OOM,
a lost machine), its leases stop being renewed; a watchdog in any other worker claims the
expired ones — atomically, so only one claims each — and sends the tasks again under the same
task ids. Tasks are idempotent, and Celery 5.7 counts a chord part once per task id, so the
original message, when the broker finally redelivers it, changes nothing.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import redis

LEASES = "refgen:leases"  # sorted set: lease id → expiry (unix seconds)
LEASE_PAYLOADS = "refgen:lease-payloads"  # hash: lease id → JSON payload to resend

_CLAIM_EXPIRED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local payload = redis.call('HGET', KEYS[2], id)
    redis.call('HDEL', KEYS[2], id)
    if payload then
      table.insert(claimed, id)
      table.insert(claimed, payload)
    end
  end
end
return claimed
"""

_RENEW = """
for i, id in ipairs(ARGV) do
  if i > 1 then redis.call('ZADD', KEYS[1], 'XX', ARGV[1], id) end
end
return 0
"""


class LeaseBook:
    def __init__(self, client: redis.Redis, ttl_s: float = 20.0) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM_EXPIRED)
        self._renew = client.register_script(_RENEW)

    def hold(self, lease_id: str, payload: dict[str, Any], *, extra_s: float = 0.0) -> None:
        """Take (or take over) a lease; it expires ``ttl_s + extra_s`` from now unless renewed."""
        pipe = self._redis.pipeline()
        pipe.hset(LEASE_PAYLOADS, lease_id, json.dumps(payload))
        pipe.zadd(LEASES, {lease_id: time.time() + self.ttl_s + extra_s})
        pipe.execute()

    def renew(self, lease_ids: list[str]) -> None:
        if lease_ids:
            self._renew(keys=[LEASES], args=[time.time() + self.ttl_s, *lease_ids])

    def release(self, lease_id: str) -> None:
        pipe = self._redis.pipeline()
        pipe.zrem(LEASES, lease_id)
        pipe.hdel(LEASE_PAYLOADS, lease_id)
        pipe.execute()

    def claim_expired(self, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """Take every expired lease, once across all callers, with its payload."""
        flat = self._claim(keys=[LEASES, LEASE_PAYLOADS], args=[time.time(), limit])
        pairs = zip(flat[0::2], flat[1::2], strict=True)
        return [(str(lease_id), json.loads(payload)) for lease_id, payload in pairs]

    def expiry(self, lease_id: str) -> float | None:
        score = self._redis.zscore(LEASES, lease_id)
        return float(score) if score is not None else None


_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class ImageLocks:
    """One delivery at a time per image. Two deliveries of one task share a task id, so the
    lease cannot tell them apart; this lock, with a token per delivery, can. Held locks are
    renewed by the watchdog's heartbeat (``renew_held``); a dead holder's lock expires."""

    def __init__(self, client: redis.Redis, ttl_s: float = 20.0) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self._release = client.register_script(_RELEASE_IF_OWNER)
        self._renew = client.register_script(_RENEW_IF_OWNER)
        self._held: dict[str, str] = {}  # key → token, this process's locks
        self._lock = threading.Lock()

    def acquire(self, key: str) -> str | None:
        token = uuid.uuid4().hex
        if self._redis.set(key, token, nx=True, px=int(self.ttl_s * 1000)):
            with self._lock:
                self._held[key] = token
            return token
        return None

    def release(self, key: str, token: str) -> None:
        with self._lock:
            self._held.pop(key, None)
        self._release(keys=[key], args=[token])

    def renew_held(self) -> None:
        with self._lock:
            held = list(self._held.items())
        for key, token in held:
            self._renew(keys=[key], args=[token, int(self.ttl_s * 1000)])
