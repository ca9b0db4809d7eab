"""Leases, image locks and deadlines against a real redis-server (their Lua is the point)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worker.deadlines import DEADLINES, JobDeadlines
from worker.leases import LEASE_PAYLOADS, LEASES, ImageLocks, LeaseBook


@pytest.fixture(autouse=True)
def clean(redis_client) -> None:
    redis_client.delete(LEASES, LEASE_PAYLOADS, DEADLINES)


def test_an_expired_lease_is_claimed_once_with_its_payload(redis_client) -> None:
    book = LeaseBook(redis_client, ttl_s=0.2)
    book.hold("task-1", {"task": "x", "args": [1]})
    assert book.claim_expired() == []  # still live
    time.sleep(0.3)
    claims: list = []
    threads = [
        threading.Thread(target=lambda: claims.extend(book.claim_expired())) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert claims == [("task-1", {"task": "x", "args": [1]})]


def test_renewal_keeps_a_lease_alive_and_release_drops_it(redis_client) -> None:
    book = LeaseBook(redis_client, ttl_s=0.3)
    book.hold("task-1", {"task": "x"})
    for _ in range(4):
        time.sleep(0.15)
        book.renew(["task-1"])
    assert book.claim_expired() == []
    book.release("task-1")
    assert book.expiry("task-1") is None
    book.renew(["task-1"])  # renewing a released lease does not bring it back
    assert book.expiry("task-1") is None


def test_extra_time_covers_a_retry_countdown(redis_client) -> None:
    book = LeaseBook(redis_client, ttl_s=0.2)
    book.hold("task-1", {"task": "x"}, extra_s=0.5)
    time.sleep(0.3)
    assert book.claim_expired() == []
    time.sleep(0.5)
    assert [t for t, _ in book.claim_expired()] == ["task-1"]


def test_image_lock_admits_one_delivery(redis_client) -> None:
    key = f"lock:{uuid.uuid4()}"
    first, second = ImageLocks(redis_client, ttl_s=0.3), ImageLocks(redis_client, ttl_s=0.3)
    token = first.acquire(key)
    assert token is not None
    assert second.acquire(key) is None
    second.release(key, "not-the-token")  # only the owner can release
    assert second.acquire(key) is None
    for _ in range(4):
        time.sleep(0.15)
        first.renew_held()
    assert second.acquire(key) is None  # renewed: still held
    first.release(key, token)
    assert second.acquire(key) is not None


def test_a_dead_holders_lock_expires(redis_client) -> None:
    key = f"lock:{uuid.uuid4()}"
    assert ImageLocks(redis_client, ttl_s=0.2).acquire(key) is not None
    time.sleep(0.3)  # nobody renews it
    assert ImageLocks(redis_client, ttl_s=0.2).acquire(key) is not None


def test_deadlines_fall_due_once_and_can_be_cancelled(redis_client) -> None:
    deadlines = JobDeadlines(redis_client)
    deadlines.schedule("job-a", 0.1)
    deadlines.schedule("job-b", 0.1)
    deadlines.schedule("job-c", 60)
    deadlines.schedule("job-a", 60)  # a redelivered start keeps the first deadline
    deadlines.cancel("job-b")
    time.sleep(0.2)
    assert deadlines.claim_due() == ["job-a"]
    assert deadlines.claim_due() == []
    assert deadlines.due_at("job-c") is not None
