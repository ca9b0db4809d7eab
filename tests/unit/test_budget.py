"""The ledger against a real redis-server: its Lua scripts are the point."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import pytest

from worker.budget import CostLedger, LedgerTotals, from_nano, to_nano
from worker.errors import BudgetExceededError


@pytest.fixture
def ledger(redis_client) -> CostLedger:
    return CostLedger(redis_client)


@pytest.fixture
def job_id() -> str:
    return str(uuid.uuid4())


def test_nano_conversion_is_exact() -> None:
    assert to_nano(Decimal("0.0006525")) == 652_500
    assert from_nano(652_500) == Decimal("0.0006525")
    assert to_nano(Decimal("0.0000000001")) == 1  # rounds up, never under-counts


def test_preflight_refuses_over_the_limit(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, Decimal("0.02"))
    ledger.preflight(job_id, Decimal("0.02"))  # equal is allowed
    with pytest.raises(BudgetExceededError) as info:
        ledger.preflight(job_id, Decimal("0.024"))
    assert info.value.limit == "0.02" and info.value.requested == "0.024"


def test_open_returns_the_totals_it_left_for_the_preflight(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, Decimal("0.02"))
    ledger.charge(job_id, "scene_0", "p1", Decimal("0.01"))
    opened = ledger.open(job_id, Decimal("0.015"))  # the job sent again, with a new limit
    assert opened == LedgerTotals(limit=Decimal("0.015"), spent=Decimal("0.01"), reserved=0)
    ledger.preflight(job_id, Decimal("0.005"), opened)
    with pytest.raises(BudgetExceededError):
        ledger.preflight(job_id, Decimal("0.006"), opened)


def test_no_limit_without_duration(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, None)
    ledger.preflight(job_id, Decimal(10_000))
    for i in range(5):
        ledger.reserve(job_id, f"scene_{i}", Decimal(1000))


def test_reserve_charge_release(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, Decimal("0.012"))
    ledger.reserve(job_id, "scene_a", Decimal("0.006"))
    ledger.reserve(job_id, "scene_b", Decimal("0.006"))
    with pytest.raises(BudgetExceededError):
        ledger.reserve(job_id, "scene_c", Decimal("0.006"))
    assert ledger.charge(job_id, "scene_a", "p1", Decimal("0.005")) == Decimal("0.005")
    ledger.release(job_id, "scene_b")
    totals = ledger.totals(job_id)
    assert (totals.spent, totals.reserved) == (Decimal("0.005"), Decimal(0))
    ledger.reserve(job_id, "scene_c", Decimal("0.006"))  # room again


def test_a_reservation_made_only_while_a_key_holds_its_token(
    ledger: CostLedger, job_id: str, redis_client
) -> None:
    ledger.open(job_id, None)
    lock = f"refgen:job:{{{job_id}}}:lock:scene_a"
    redis_client.set(lock, b"mine")
    assert ledger.reserve(job_id, "scene_a", Decimal("0.006"), while_held=(lock, b"mine"))
    assert ledger.totals(job_id).reserved == Decimal("0.006")
    redis_client.set(lock, b"theirs")  # taken over by another delivery
    assert not ledger.reserve(job_id, "scene_b", Decimal("0.006"), while_held=(lock, b"mine"))
    redis_client.delete(lock)  # expired
    assert not ledger.reserve(job_id, "scene_c", Decimal("0.006"), while_held=(lock, b"mine"))
    assert ledger.totals(job_id).reserved == Decimal("0.006")  # neither held anything
    assert set(redis_client.hkeys(f"refgen:job:{{{job_id}}}:reservations")) == {"scene_a"}


def test_a_paid_call_is_charged_once(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, None)
    ledger.reserve(job_id, "scene_a", Decimal("0.006"))
    assert ledger.charge(job_id, "scene_a", "pred-1", Decimal("0.005")) == Decimal("0.005")
    # The same prediction reported again (a resumed or redelivered task): the first stands.
    assert ledger.charge(job_id, "scene_a", "pred-1", Decimal("0.009")) == Decimal("0.005")
    assert ledger.totals(job_id).spent == Decimal("0.005")
    assert ledger.totals(job_id).reserved == Decimal(0)
    assert ledger.image_costs(job_id) == {"scene_a": Decimal("0.005")}


def test_every_paid_call_of_an_image_counts(ledger: CostLedger, job_id: str) -> None:
    """A first attempt cancelled at its deadline still bills the time it ran."""
    ledger.open(job_id, None)
    ledger.charge(job_id, "scene_a", "pred-1", Decimal("0.002"))
    assert ledger.charge(job_id, "scene_a", "pred-2", Decimal("0.005")) == Decimal("0.007")
    ledger.charge(job_id, "scene_b", "pred-3", Decimal("0.004"))
    assert ledger.image_costs(job_id) == {"scene_a": Decimal("0.007"), "scene_b": Decimal("0.004")}
    assert ledger.totals(job_id).spent == Decimal("0.011")


def test_reservations_are_atomic_across_threads(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, Decimal("0.06"))  # room for exactly ten reservations of 0.006
    won: list[str] = []

    def grab(i: int) -> None:
        try:
            ledger.reserve(job_id, f"img_{i}", Decimal("0.006"))
            won.append(f"img_{i}")
        except BudgetExceededError:
            pass

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 10
    assert ledger.totals(job_id).reserved == Decimal("0.06")


def test_a_refused_job_sent_again_gets_its_new_limit(ledger: CostLedger, job_id: str) -> None:
    ledger.open(job_id, Decimal("0.02"))
    with pytest.raises(BudgetExceededError):
        ledger.preflight(job_id, Decimal("0.024"))
    ledger.open(job_id, Decimal(600))  # the same job id, sent again with a longer video
    ledger.preflight(job_id, Decimal("0.024"))
    assert ledger.totals(job_id).limit == Decimal(600)
    ledger.open(job_id, None)  # and with no duration: no limit at all
    assert ledger.totals(job_id).limit is None
