"""Per-job cost ledger in Redis (SPEC §6).

Amounts are integer nano-dollars. Reservation and charge are Lua scripts (``worker/lua/``), so
that two workers racing for the last dollars of a budget cannot both win, and so that what a
provider billed is recorded once however often its task runs: each charge is keyed by the image
and the provider's reference for the paid call (a prediction id).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import redis

from worker import constants as c
from worker.errors import BudgetExceededError
from worker.models import money
from worker.replication import Replication
from worker.scripts import register


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

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int = c.JOB_STATE_TTL_S,
        replication: Replication | None = None,
    ) -> None:
        self._redis = client
        self._ttl = ttl_s
        self._replication = replication or Replication(client)
        self._reserve = register(client, "ledger_reserve")
        self._charge = register(client, "ledger_charge")
        self._release = register(client, "ledger_release")

    def _keys(self, job_id: str) -> list[str]:
        keys = c.JobKeys(job_id)
        return [keys.ledger, keys.reservations, keys.charges]

    def open(self, job_id: str, limit: Decimal | None) -> LedgerTotals:
        """Set the job's limit. A job refused for its budget can be sent again, corrected,
        under the same id: the limit is the latest admitted start's. Returns the totals as
        the same step left them, for the pre-flight: ``start`` sends the job's images only
        after both, so they take one round trip, not two."""
        ledger = c.JobKeys(job_id).ledger
        pipe = self._redis.pipeline()
        pipe.hsetnx(ledger, "spent", 0)
        pipe.hsetnx(ledger, "reserved", 0)
        if limit is not None:
            pipe.hset(ledger, "limit", to_nano(limit))
        else:
            pipe.hdel(ledger, "limit")
        pipe.expire(ledger, self._ttl)
        pipe.hgetall(ledger)
        return _totals(pipe.execute()[-1])

    def totals(self, job_id: str) -> LedgerTotals:
        return _totals(self._redis.hgetall(c.JobKeys(job_id).ledger))

    def preflight(self, job_id: str, estimate: Decimal, totals: LedgerTotals | None = None) -> None:
        """Refuse the whole job when its spend plus the estimate exceeds the limit
        (``totals``: as ``open`` returned them; read here otherwise)."""
        totals = totals or self.totals(job_id)
        if totals.limit is not None and totals.spent + estimate > totals.limit:
            raise BudgetExceededError(
                f"Budget exceeded: this job is estimated at ${money(estimate)} but its "
                f"limit is ${money(totals.limit)} (already spent ${money(totals.spent)})",
                limit=money(totals.limit) if totals.limit is not None else None,
                spent=money(totals.spent),
                requested=money(estimate),
            )

    def reserve(
        self,
        job_id: str,
        image_key: str,
        amount: Decimal,
        *,
        while_held: tuple[str, bytes] | None = None,
    ) -> bool:
        """Hold ``amount`` for one image before its paid call. Idempotent per image.
        ``while_held``: a key and the value it must hold for the hold to be made, checked in
        the same step (an image's lock and its token); False when it did not hold it."""
        keys = self._keys(job_id)[:2]
        args: list[str | bytes | int] = [image_key, to_nano(amount), self._ttl]
        if while_held is not None:
            keys.append(while_held[0])
            args.append(while_held[1])
        held, spent, reserved = self._reserve(keys=keys, args=args)
        if int(held) < 0:
            return False
        if not held:
            totals = self.totals(job_id)
            raise BudgetExceededError(
                f"Budget exceeded: ${money(from_nano(int(spent)))} spent and "
                f"${money(from_nano(int(reserved)))} reserved leave no room for another "
                f"image under the ${money(totals.limit or Decimal(0))} limit",
                limit=money(totals.limit) if totals.limit is not None else None,
                spent=money(from_nano(int(spent))),
                requested=money(amount),
            )
        return True

    def charge(
        self, job_id: str, image_key: str, ref: str, cost: Decimal, *, made_note: str = ""
    ) -> Decimal:
        """Record what one paid call of an image cost, once per ``ref``; drops the image's
        reservation; with ``made_note``, notes the image as made in the same step. Returns the
        image's cost on record, all its paid calls together."""
        keys = c.JobKeys(job_id)
        (total,) = self._replication.write(
            "charge",
            lambda pipe: self._charge(
                keys=[*self._keys(job_id), keys.made],
                args=[image_key, ref, to_nano(cost), self._ttl, made_note],
                client=pipe,
            ),
        )
        return from_nano(int(total))

    def release(self, job_id: str, image_key: str) -> None:
        """Drop an image's reservation when its paid call did not happen."""
        self._release(keys=self._keys(job_id)[:2], args=[image_key])

    def image_costs(self, job_id: str) -> dict[str, Decimal]:
        """Each image's cost: the sum of what its paid calls were charged."""
        nano: dict[str, int] = defaultdict(int)
        for field, value in self._redis.hgetall(c.JobKeys(job_id).charges).items():
            nano[str(field).split("|", 1)[0]] += int(value)
        return {image: from_nano(amount) for image, amount in nano.items()}


def _totals(raw: dict[Any, Any]) -> LedgerTotals:
    limit = raw.get("limit")
    return LedgerTotals(
        limit=from_nano(int(limit)) if limit is not None else None,
        spent=from_nano(int(raw.get("spent", 0))),
        reserved=from_nano(int(raw.get("reserved", 0))),
    )
