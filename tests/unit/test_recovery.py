"""Leases, image locks, deadlines, the heartbeat and the watchdog against a real redis-server
(their Lua and their threads are the point)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from worker import constants as c
from worker.recovery import (
    Deadlines,
    Heartbeat,
    Holdings,
    ImageLocks,
    Leases,
    OrphanClock,
    Ticker,
    Watchdog,
)


@pytest.fixture(autouse=True)
def clean(redis_client) -> None:
    redis_client.delete(c.LEASES, c.LEASE_RECORDS, c.DEADLINES)


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def redis_now(client) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1_000_000)


def lapse(client, key: str, member: str) -> None:
    """Its time is up on the Redis clock (the one the scripts compare with): what a lease or
    a claim comes to once nobody renews it, without waiting for it on a busy machine."""
    client.zadd(key, {member: redis_now(client) - 1})


def test_an_expired_lease_is_claimed_once_and_kept_not_deleted(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=30)
    leases.take("task-1", {"task": "x", "args": [1]})
    assert leases.claim_expired("w", hold_s=5) == []  # still live
    lapse(redis_client, c.LEASES, "task-1")
    claims: list = []
    threads = [
        threading.Thread(target=lambda: claims.extend(leases.claim_expired("w", hold_s=5)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [(cl.task_id, cl.payload) for cl in claims] == [("task-1", {"task": "x", "args": [1]})]
    # The claim holds the lease; it does not delete it.
    assert redis_client.hexists(c.LEASE_RECORDS, "task-1")
    assert leases.expiry("task-1") is not None


def test_a_claim_whose_resend_never_happened_is_claimed_again(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=30)
    leases.take("task-1", {"task": "x"})
    lapse(redis_client, c.LEASES, "task-1")
    first = leases.claim_expired("dead-watchdog", hold_s=30)
    assert len(first) == 1
    assert leases.claim_expired("live-watchdog", hold_s=5) == []  # held by the claim
    lapse(redis_client, c.LEASES, "task-1")  # the claimer died: nothing extended its claim
    second = leases.claim_expired("live-watchdog", hold_s=5)
    assert [cl.task_id for cl in second] == ["task-1"]
    assert second[0].token != first[0].token


def test_a_lease_belongs_to_one_delivery(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=5)
    old = leases.take("task-1", {"task": "x"})
    new = leases.take("task-1", {"task": "x"})  # a re-sent delivery takes it over
    assert leases.renew({"task-1": old}) == ["task-1"]  # the old one learns it lost it
    assert leases.release("task-1", old) is False  # and cannot release the new one's
    assert leases.expiry("task-1") is not None
    assert leases.renew({"task-1": new}) == []
    assert leases.release("task-1", new) is True
    assert leases.expiry("task-1") is None
    assert leases.renew({"task-1": new}) == ["task-1"]  # released: renewal does not revive it
    assert leases.expiry("task-1") is None


def test_a_retrys_hand_over_is_held_but_not_by_a_delivery(redis_client) -> None:
    """The orphan rescue restores an unacked message whose lease no delivery holds: a retry
    taken from the broker by a worker that died before leasing it still had its hand-over's
    lease (minutes long), and waited for it to expire."""
    leases = Leases(redis_client, ttl_s=5)
    task = f"t-{uuid.uuid4().hex}"
    assert (
        not redis_client.hexists(c.LEASE_RECORDS, task) and leases.standing(task, 0) == "orphaned"
    )
    retry = {"task": "x", "options": {"retries": 1}}
    leases.take(task, retry, extra_s=2, queued=True)
    assert redis_client.hexists(c.LEASE_RECORDS, task) and leases.standing(task, 1) == "orphaned"
    leases.take(task, retry)  # a worker received the retry: its delivery takes over
    assert redis_client.hexists(c.LEASE_RECORDS, task) and leases.standing(task, 1) == "delivered"


def test_an_attempt_that_handed_its_task_to_a_retry_is_superseded(redis_client) -> None:
    """A worker killed after sending its retry leaves both messages in its unacked set: the
    attempt that handed over (its work done) and the retry. Put back, the first would run
    that attempt again, and an image could be made by its first attempt after its retry
    was announced; the rescue drops it and puts the retry back."""
    leases = Leases(redis_client, ttl_s=5)
    task = f"t-{uuid.uuid4().hex}"
    leases.take(task, {"task": "x", "options": {"retries": 0}})  # the first attempt's delivery
    leases.take(task, {"task": "x", "options": {"retries": 1}}, extra_s=2, queued=True)
    assert leases.standing(task, 0) == "superseded"
    assert leases.standing(task, 1) == "orphaned"


def test_renewal_keeps_a_lease_alive(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=30)
    token = leases.take("task-1", {"task": "x"})
    for _ in range(2):
        lapse(redis_client, c.LEASES, "task-1")  # about to be claimed...
        before = redis_now(redis_client)
        assert leases.renew({"task-1": token}) == []
        expiry = leases.expiry("task-1")  # ...renewed for a lifetime, on the Redis clock
        assert expiry is not None and before + 30 <= expiry <= redis_now(redis_client) + 30
    assert leases.claim_expired("w", hold_s=5) == []


def test_extra_time_covers_a_retry_countdown(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=0.2)
    before = redis_now(redis_client)
    leases.take("task-1", {"task": "x"}, extra_s=0.5)
    expiry = leases.expiry("task-1")  # a lifetime and the countdown, on the Redis clock
    assert expiry is not None and before + 0.7 <= expiry <= redis_now(redis_client) + 0.7
    wait_until(lambda: redis_now(redis_client) > expiry)
    assert [cl.task_id for cl in leases.claim_expired("w", hold_s=5)] == ["task-1"]


def test_expiries_are_on_the_redis_clock_not_the_hosts(redis_client, monkeypatch) -> None:
    """A host whose clock is an hour fast must not expire anyone's lease early."""
    leases = Leases(redis_client, ttl_s=30)
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # this host's clock is wrong
    before = redis_now(redis_client)
    leases.take("task-1", {"task": "x"})
    expiry = leases.expiry("task-1")
    assert expiry is not None and before + 30 <= expiry <= redis_now(redis_client) + 30
    assert leases.claim_expired("w", hold_s=5) == []


def test_image_lock_admits_one_delivery_and_knows_when_it_was_lost(redis_client) -> None:
    key = f"lock:{uuid.uuid4()}"
    mine, theirs = Holdings(), Holdings()
    first = ImageLocks(redis_client, 30, mine)
    second = ImageLocks(redis_client, 30, theirs)
    lock = first.try_acquire(key)
    assert lock is not None and first.token_if_held(lock) == (key, lock.local.token)
    assert second.try_acquire(key) is None
    heartbeat = Heartbeat(Leases(redis_client, ttl_s=30), mine)
    redis_client.pexpire(key, 1000)  # a second left of it...
    heartbeat.beat()
    assert redis_client.pttl(key) > 1000  # ...renewed for a lifetime by the heartbeat
    assert second.try_acquire(key) is None  # renewed: still held
    redis_client.pexpire(key, 1)  # frozen: nobody renews it, and it expires
    wait_until(lambda: not redis_client.exists(key))
    taken = second.try_acquire(key)
    assert taken is not None
    heartbeat.beat()  # the thawed holder's heartbeat finds out ...
    assert first.token_if_held(lock) is None  # ... and its delivery will not pay again
    first.release(lock)  # and its release does not free the new holder's lock
    assert second.token_if_held(taken) == (key, taken.local.token)
    assert redis_client.get(key).encode() == taken.local.token


def test_heartbeat_reports_a_lease_taken_over(redis_client) -> None:
    holdings = Holdings()
    leases = Leases(redis_client, ttl_s=5)
    holdings.hold_lease("task-1", leases.take("task-1", {"task": "x"}))
    leases.take("task-1", {"task": "x"})  # another delivery of the same task
    Heartbeat(leases, holdings).beat()
    assert holdings.leases() == {}  # no longer ours: no longer renewed or released by us


def test_deadlines_are_claimed_by_pushing_them_out_and_go_when_done(redis_client) -> None:
    deadlines = Deadlines(redis_client)
    seconds, _ = redis_client.time()
    redis_client.zadd(c.DEADLINES, {"job-a": seconds - 1, "job-b": seconds + 60})
    before = redis_now(redis_client)
    assert deadlines.claim_due(hold_s=30) == ["job-a"]
    due = deadlines.due_at("job-a")  # pushed out by the hold, on the Redis clock
    assert due is not None and before + 30 <= due <= redis_now(redis_client) + 30
    assert deadlines.claim_due(hold_s=30) == []  # held by the claimer
    lapse(redis_client, c.DEADLINES, "job-a")  # the claimer died before the result was stored
    assert deadlines.claim_due(hold_s=30) == ["job-a"]
    deadlines.done("job-a")
    assert deadlines.due_at("job-a") is None
    assert deadlines.due_at("job-b") is not None


def test_watchdog_resends_and_a_failed_resend_is_retried(redis_client) -> None:
    leases = Leases(redis_client, ttl_s=0.2)
    leases.take("task-1", {"task": "x"})
    sent: list[dict[str, Any]] = []
    attempts = {"n": 0}

    def resend(payload: dict[str, Any]) -> None:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise ConnectionError("broker unreachable")
        sent.append(payload)

    watchdog = Watchdog(
        leases,
        Deadlines(redis_client),
        resend=resend,
        finalize_overdue=lambda job_id: None,
        claimer="w",
    )
    watchdog._claim_hold_s = 0.2  # a short hold, so the failed claim comes back quickly
    time.sleep(0.3)
    watchdog.patrol()
    assert sent == [] and attempts["n"] == 1
    time.sleep(0.3)
    watchdog.patrol()
    assert sent == [{"task": "x"}]
    expiry = leases.expiry("task-1")
    seconds, _ = redis_client.time()
    assert expiry is not None and expiry > seconds + 50  # queued: covered for the grace
    # Held by the message sent again, not by a delivery: a worker that takes it off the broker
    # and dies before leasing it leaves it to the orphan rescue.
    assert (
        redis_client.hexists(c.LEASE_RECORDS, "task-1")
        and leases.standing("task-1", 0) == "orphaned"
    )


def test_lease_renewal_never_waits_on_recovery_work(redis_client) -> None:
    """The watchdog is busy for several lease lifetimes (a slow finalize); this process's
    leases stay alive, because the heartbeat has a thread of its own."""
    leases = Leases(redis_client, ttl_s=0.4)
    holdings = Holdings()
    holdings.hold_lease("mine", leases.take("mine", {"task": "x"}))
    seconds, _ = redis_client.time()
    redis_client.zadd(c.DEADLINES, {"slow-job": seconds - 1})
    busy, released = threading.Event(), threading.Event()

    def slow_finalize(job_id: str) -> None:
        busy.set()
        released.wait(30)  # stuck until the test lets it go: certainly, not for a while

    heartbeat = Heartbeat(leases, holdings)
    watchdog = Watchdog(
        leases,
        Deadlines(redis_client),
        resend=lambda payload: None,
        finalize_overdue=slow_finalize,
        claimer="w",
    )
    tickers = [
        Ticker("test_heartbeat", heartbeat.beat, 0.1),
        Ticker("test_watchdog", watchdog.patrol, 0.1),
    ]
    for ticker in tickers:
        ticker.start()
    try:
        wait_until(busy.is_set)
        # Renewed by the heartbeat while the watchdog is stuck: the lease comes to run past
        # three of its lifetimes (on the Redis clock) from the moment it got stuck.
        stuck_at = redis_now(redis_client)
        wait_until(lambda: (leases.expiry("mine") or 0) > stuck_at + 3 * 0.4)
        assert not released.is_set() and holdings.leases() != {}
    finally:
        released.set()
        for ticker in tickers:
            ticker.stop()


def test_an_overdue_job_being_finalized_never_holds_up_the_resends(redis_client) -> None:
    """A deadline's finalize waits up to 15 s for what runs to stop; a patrol that waited with
    it left every lost task of the cluster unsent meanwhile, one such wait per overdue job."""
    leases = Leases(redis_client, ttl_s=30)
    seconds, _ = redis_client.time()
    redis_client.zadd(c.DEADLINES, {"slow-job": seconds - 1})
    busy, released = threading.Event(), threading.Event()
    begun: list[str] = []
    finalized: list[str] = []
    sent: list[dict[str, Any]] = []

    def slow_finalize(job_id: str) -> None:
        begun.append(job_id)
        busy.set()
        released.wait(30)
        finalized.append(job_id)

    watchdog = Watchdog(
        leases,
        Deadlines(redis_client),
        resend=sent.append,
        finalize_overdue=slow_finalize,
        claimer="w",
    )
    patrols = threading.Thread(target=lambda: [watchdog.patrol(), watchdog.patrol()])
    try:
        patrols.start()
        wait_until(busy.is_set)
        leases.take("lost", {"task": "x"})
        lapse(redis_client, c.LEASES, "lost")  # a task whose worker died meanwhile
        lapse(redis_client, c.DEADLINES, "slow-job")  # due again: not taken twice
        patrols.join(10)
        assert not patrols.is_alive()
        watchdog.patrol()
        assert sent == [{"task": "x"}] and finalized == []  # sent while the finalize waits
    finally:
        released.set()
    wait_until(lambda: finalized == ["slow-job"])
    watchdog.patrol()  # its deadline is held by the claim: not finalized again
    assert begun == ["slow-job"]


def test_a_watchdog_claims_no_more_overdue_jobs_than_it_finalizes_at_once(redis_client) -> None:
    """A claim left waiting behind other finalizes past its hold would be taken by another
    watchdog too: two finalizes of one job, each stopping its spending."""
    seconds, _ = redis_client.time()
    overdue = [f"job-{n}" for n in range(6)]
    redis_client.zadd(c.DEADLINES, {job_id: seconds - 1 for job_id in overdue})
    released = threading.Event()
    begun: list[str] = []

    def slow_finalize(job_id: str) -> None:
        begun.append(job_id)
        released.wait(30)

    watchdog = Watchdog(
        Leases(redis_client, ttl_s=30),
        Deadlines(redis_client),
        resend=lambda payload: None,
        finalize_overdue=slow_finalize,
        claimer="w",
    )
    try:
        watchdog.patrol()
        wait_until(lambda: len(begun) == 4)
        watchdog.patrol()  # every thread busy: it claims nothing
        unclaimed = Deadlines(redis_client).claim_due(hold_s=60)
        assert len(unclaimed) == 2 and not set(unclaimed) & set(begun)
    finally:
        released.set()


def test_a_ticker_stopped_with_a_wait_lets_the_step_under_way_end_first() -> None:
    """The presence goodbye relies on it: a beat still under way must not land after it."""
    entered, release = threading.Event(), threading.Event()
    events: list[str] = []

    def step() -> None:
        entered.set()
        release.wait(5)
        events.append("step ended")

    ticker = Ticker("test_slow_step", step, 0.01)
    ticker.start()
    assert entered.wait(5)
    threading.Timer(0.2, release.set).start()
    ticker.stop(wait_s=5)
    events.append("stopped")
    assert events == ["step ended", "stopped"]


def test_orphans_are_timed_on_the_redis_clock_not_by_kombus_host_stamps(
    redis_client, monkeypatch
) -> None:
    """Issue 20, item 9: kombu stamps its unacked index with the delivering host's clock. A
    rescuing host an hour fast must not put back a message taken a moment ago; the time an
    unleased message has waited is counted on the Redis clock from when it was first seen."""
    redis_client.delete(c.ORPHANS_FIRST_SEEN)
    orphans = OrphanClock(redis_client)
    monkeypatch.setattr(time, "time", lambda: 4_000_000_000.0)  # this host's clock is wrong
    assert orphans.due(["tag-1", "tag-2"], hold_s=0.3) == []
    time.sleep(0.4)
    assert orphans.due(["tag-1", "tag-3"], hold_s=0.3) == ["tag-1"]  # tag-3 only just seen
    assert orphans.due(["tag-3"], hold_s=0.3) == []  # tag-1 restored (or acked): forgotten
    assert redis_client.hkeys(c.ORPHANS_FIRST_SEEN) == ["tag-3"]


def test_an_image_lock_whose_set_was_sent_twice_is_held_by_its_delivery(
    redis_client, monkeypatch
) -> None:
    """Issue 20, item 7: redis-py re-sends the lock's SET NX when its reply is lost; the
    second send finds the key holding this delivery's own token. That is the lock acquired,
    not another delivery's: the image must not wait a lock lifetime for nobody."""
    from redis.lock import Lock

    locks = ImageLocks(redis_client, ttl_s=20, holdings=Holdings())
    key = f"lock-{uuid.uuid4().hex}"
    plain = Lock.do_acquire

    def sent_twice(self: Lock, token: bytes) -> bool:
        plain(self, token)  # the first send: done, its reply lost
        return bool(plain(self, token))  # the retry: the key is already set

    monkeypatch.setattr(Lock, "do_acquire", sent_twice)
    lock = locks.try_acquire(key)
    assert lock is not None and lock.owned()


def test_claims_run_again_answer_the_same(redis_client) -> None:
    """Issue 20, item 7: a claim retried after its reply was lost answered nothing (its
    leases and deadlines were already pushed out), so recovery waited out the claims' hold."""
    leases = Leases(redis_client, ttl_s=0.05)
    task = f"task-{uuid.uuid4().hex}"
    leases.take(task, {"task": "x"})
    job = f"job-{uuid.uuid4().hex}"
    redis_client.zadd(c.DEADLINES, {job: 1.0})  # long due
    time.sleep(0.1)
    first = leases.claim_expired("w", hold_s=5, request_id="r-1")
    again = leases.claim_expired("w", hold_s=5, request_id="r-1")
    assert [cl.task_id for cl in first] == [task] and again == first
    assert leases.claim_expired("w", hold_s=5, request_id="r-2") == []
    deadlines = Deadlines(redis_client)
    due = deadlines.claim_due(hold_s=5, request_id="d-1")
    assert job in due and deadlines.claim_due(hold_s=5, request_id="d-1") == due
    assert job not in deadlines.claim_due(hold_s=5, request_id="d-2")
    deadlines.done(job)
