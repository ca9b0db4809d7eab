"""Per-job cost ledger in Redis (SPEC §6).

Amounts are integer nano-dollars. Reservation and charge are Lua scripts, so that two workers
racing for the last dollars of a budget cannot both win, and so that an image is charged once
however often its task runs: the charge is keyed by the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

import redis

from worker import constants as c
from worker.errors import BudgetExceededError
from worker.models import money

_RESERVE = """
local ledger, reservations, charges = KEYS[1], KEYS[2], KEYS[3]
local image, amount, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HEXISTS', charges, image) == 1 or redis.call('HEXISTS', reservations, image) == 1
then
  return {1, 0, 0}
end
local spent = tonumber(redis.call('HGET', ledger, 'spent') or '0')
local reserved = tonumber(redis.call('HGET', ledger, 'reserved') or '0')
local limit = redis.call('HGET', ledger, 'limit')
if limit and spent + reserved + amount > tonumber(limit) then
  return {0, spent, reserved}
end
redis.call('HSET', reservations, image, amount)
redis.call('HINCRBY', ledger, 'reserved', amount)
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return {1, spent, reserved + amount}
"""

_CHARGE = """
local ledger, reservations, charges = KEYS[1], KEYS[2], KEYS[3]
local image, cost, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local existing = redis.call('HGET', charges, image)
if existing then return tonumber(existing) end
redis.call('HSET', charges, image, cost)
redis.call('HINCRBY', ledger, 'spent', cost)
local held = redis.call('HGET', reservations, image)
if held then
  redis.call('HDEL', reservations, image)
  redis.call('HINCRBY', ledger, 'reserved', -tonumber(held))
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ttl) end
return cost
"""

_RELEASE = """
local ledger, reservations = KEYS[1], KEYS[2]
local held = redis.call('HGET', reservations, ARGV[1])
if held then
  redis.call('HDEL', reservations, ARGV[1])
  redis.call('HINCRBY', ledger, 'reserved', -tonumber(held))
end
return 0
"""


def to_nano(amount: Decimal) -> int:
    # Round up: a ledger that under-counts by a fraction of a cent could overspend a limit.
    return int((amount * c.NANO_PER_DOLLAR).to_integral_value(rounding=ROUND_CEILING))


def from_nano(amount: int) -> Decimal:
    return (Decimal(amount) / c.NANO_PER_DOLLAR).normalize() if amount else Decimal(0)


@dataclass(frozen=True)
class LedgerTotals:
    limit: Decimal | None
    spent: Decimal
    reserved: Decimal


class CostLedger:
    """Takes a ready-made Redis client; tests pass one pointed at their own server."""

    def __init__(self, client: redis.Redis, ttl_s: int = c.JOB_STATE_TTL_S) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._reserve = client.register_script(_RESERVE)
        self._charge = client.register_script(_CHARGE)
        self._release = client.register_script(_RELEASE)

    def _keys(self, job_id: str) -> list[str]:
        keys = c.JobKeys(job_id)
        return [keys.ledger, keys.reservations, keys.charges]

    def open(self, job_id: str, limit: Decimal | None) -> None:
        """Set the job's limit once; a redelivered ``start`` keeps the first one."""
        ledger = c.JobKeys(job_id).ledger
        pipe = self._redis.pipeline()
        pipe.hsetnx(ledger, "spent", 0)
        pipe.hsetnx(ledger, "reserved", 0)
        if limit is not None:
            pipe.hsetnx(ledger, "limit", to_nano(limit))
        pipe.expire(ledger, self._ttl)
        pipe.execute()

    def totals(self, job_id: str) -> LedgerTotals:
        raw = self._redis.hgetall(c.JobKeys(job_id).ledger)
        limit = raw.get("limit")
        return LedgerTotals(
            limit=from_nano(int(limit)) if limit is not None else None,
            spent=from_nano(int(raw.get("spent", 0))),
            reserved=from_nano(int(raw.get("reserved", 0))),
        )

    def preflight(self, job_id: str, estimate: Decimal) -> None:
        """Refuse the whole job when its spend plus the estimate exceeds the limit."""
        totals = self.totals(job_id)
        if totals.limit is not None and totals.spent + estimate > totals.limit:
            raise BudgetExceededError(
                f"Budget exceeded: this job is estimated at ${money(estimate)} but its "
                f"limit is ${money(totals.limit)} (already spent ${money(totals.spent)})",
                limit=money(totals.limit) if totals.limit is not None else None,
                spent=money(totals.spent),
                requested=money(estimate),
            )

    def reserve(self, job_id: str, image_key: str, amount: Decimal) -> None:
        """Hold ``amount`` for one image before its paid call. Idempotent per image."""
        ok, spent, reserved = self._reserve(
            keys=self._keys(job_id), args=[image_key, to_nano(amount), self._ttl]
        )
        if not ok:
            totals = self.totals(job_id)
            raise BudgetExceededError(
                f"Budget exceeded: ${money(from_nano(int(spent)))} spent and "
                f"${money(from_nano(int(reserved)))} reserved leave no room for another "
                f"image under the ${money(totals.limit or Decimal(0))} limit",
                limit=money(totals.limit) if totals.limit is not None else None,
                spent=money(from_nano(int(spent))),
                requested=money(amount),
            )

    def charge(self, job_id: str, image_key: str, cost: Decimal) -> Decimal:
        """Record an image's real cost, once. Returns the cost on record for the image."""
        recorded = self._charge(keys=self._keys(job_id), args=[image_key, to_nano(cost), self._ttl])
        return from_nano(int(recorded))

    def release(self, job_id: str, image_key: str) -> None:
        """Drop an image's reservation when its paid call did not happen."""
        self._release(keys=self._keys(job_id)[:2], args=[image_key])

    def charges(self, job_id: str) -> dict[str, Decimal]:
        raw = self._redis.hgetall(c.JobKeys(job_id).charges)
        return {str(k): from_nano(int(v)) for k, v in raw.items()}
