"""Lost work is found in seconds and never lost on the way: the whole life of a delivery.

A *delivery* is one run of one task message on one worker. Its life:

1. It starts and takes its task's **lease** (``Leases.take``): a record in Redis of the message
   to send again, with a token that is this delivery's alone and an expiry on the Redis clock.
2. While it runs, its process's **heartbeat** renews its leases and image locks every
   ``ttl / 4``, on a thread of its own that never waits on recovery work.
3. An image delivery holds the image's **lock** (redis-py's ``Lock``, one token per delivery)
   while it pays and uploads, so two deliveries of one image never run at once; a delivery
   whose lock was taken over (it froze longer than the lock's life) stops before paying again.
   A delivery that finds the lock held (it is a copy: a re-send, a redelivery) does not wait
   for it: it hands its lease to a message of itself due when the lock would have lapsed were
   its holder dead, sends that, and frees its slot (``look_again_later`` in ``tasks/``).
4. It ends one of three ways:
   - done: it releases its lease, if the lease is still its own (a newer delivery of the same
     task may have taken it over; then the release changes nothing);
   - handed to a retry: the lease now carries the retry message and covers the countdown;
     once the retry is sent, it also covers the retry's wait in the queue, as a re-sent
     task's does (5.): under load a retry waits behind busy slots far longer than a lease;
   - abandoned (Redis unreachable, or its image lock lost): it keeps the lease and stops
     renewing it, so the lease expires and the task is sent again.
5. If its process dies, nothing renews its lease. The **watchdog** (a thread in every worker)
   claims expired leases. A claim takes a lease over and gives it a short hold; it deletes
   nothing. The watchdog sends the message again, then extends the lease to cover the wait in
   the queue. A watchdog that dies or fails to send leaves the claim to expire and be claimed
   again: the task cannot be lost between the claim and the re-send.
6. A message taken from the broker by a worker that died before it could lease it (the instant
   between the broker's pop and the worker's receipt) is found by the watchdog too: unacked
   for longer than a lease's life with no lease, it goes back to its queue (``rescue_orphans``
   in ``tasks/recovery.py``, which knows the broker's bookkeeping).
7. Every job has a **deadline**, claimed by the watchdog the same way (pushed out, not
   removed); the job is finalized with what exists, and the deadline goes only once the job's
   result is stored.

Every expiry is on the Redis server's clock (the scripts read ``TIME``), so hosts whose clocks
disagree cannot expire each other's leases early.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis
import structlog
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from worker import constants as c
from worker.crashpoints import crash_point
from worker.scripts import register

log = structlog.get_logger(__name__)


# The token of a lease held by a message on the broker (a retry's hand-over), not a delivery.
QUEUED_HOLDER = "queued-"
Standing = Literal["delivered", "orphaned", "superseded"]


@dataclass(frozen=True)
class Claim:
    task_id: str
    token: str
    payload: dict[str, Any]


class Leases:
    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        # How long a message sent again (by the watchdog, or as a retry) may wait in the
        # queue before it counts as lost: nobody holds it there to renew its lease, and under
        # load it waits as long as the slots ahead of it take (an image: up to minutes).
        self.queued_grace_s = max(300.0, 10 * ttl_s)
        self._keys = [c.LEASES, c.LEASE_RECORDS]
        self._hold = register(client, "lease_hold")
        self._renew = register(client, "lease_renew")
        self._release = register(client, "lease_release")
        self._extend = register(client, "lease_extend")
        self._claim = register(client, "lease_claim")

    def take(
        self, task_id: str, payload: dict[str, Any], *, extra_s: float = 0.0, queued: bool = False
    ) -> str:
        """Take (or take over) a task's lease for a new holder; returns the holder's token.
        ``queued``: the holder is a message on the broker (a retry handed its lease), not a
        delivery; its token says so (``standing``)."""
        token = (QUEUED_HOLDER if queued else "") + uuid.uuid4().hex
        self._hold(
            keys=self._keys, args=[task_id, token, json.dumps(payload), self.ttl_s + extra_s]
        )
        return token

    def renew(self, held: dict[str, str]) -> list[str]:
        """Renew ``{task_id: token}``; returns the task ids whose lease is no longer ours."""
        if not held:
            return []
        pairs = [item for pair in held.items() for item in pair]
        return [str(t) for t in self._renew(keys=self._keys, args=[self.ttl_s, *pairs])]

    def release(self, task_id: str, token: str) -> bool:
        return bool(self._release(keys=self._keys, args=[task_id, token]))

    def extend(self, task_id: str, token: str, seconds: float, *, queued: bool = False) -> bool:
        """``queued``: the holder is now the task's message on the broker (the watchdog's claim,
        once it has sent the task again); its token on record says so (``standing``)."""
        holder = QUEUED_HOLDER if queued else ""
        return bool(self._extend(keys=self._keys, args=[task_id, token, seconds, holder]))

    def claim_expired(
        self, claimer: str, *, hold_s: float, limit: int = 100, request_id: str | None = None
    ) -> list[Claim]:
        """``request_id``: one per call (redis-py's retry of the call re-sends the same)."""
        reply = c.claim_reply(request_id or uuid.uuid4().hex)
        flat = self._claim(keys=[*self._keys, reply], args=[limit, hold_s, claimer])
        triples = zip(flat[0::3], flat[1::3], flat[2::3], strict=True)
        return [Claim(str(t), str(k), json.loads(p)) for t, k, p in triples]

    def expiry(self, task_id: str) -> float | None:
        score = self._redis.zscore(c.LEASES, task_id)
        return float(score) if score is not None else None

    def standing(self, task_id: str, attempt: int) -> Standing:
        """What a message of ``task_id``'s ``attempt`` (its ``retries``) that a worker took
        from the broker is to the orphan rescue: held by a delivery (``"delivered"``: leave
        it); held by nobody, or by a message on the broker (a hand-over: its lease stops
        covering it once a worker has taken it), so lost with the worker that took it
        (``"orphaned"``: put it back); or an attempt that handed its task to a later one
        (``"superseded"``: drop it, for putting it back would run that attempt again)."""
        record = self._redis.hget(c.LEASE_RECORDS, task_id)
        if record is None:
            return "orphaned"
        token, _, payload = str(record).partition(" ")
        if not token.startswith(QUEUED_HOLDER):
            return "delivered"
        try:
            handed_to = int((json.loads(payload).get("options") or {}).get("retries") or 0)
        except (ValueError, TypeError, AttributeError):
            handed_to = 0
        return "superseded" if attempt < handed_to else "orphaned"


class Deadlines:
    """Job deadlines. They are scheduled with the job's plan (``begin_job.lua``), in one step."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._claim = register(client, "deadline_claim")

    def claim_due(
        self, *, hold_s: float, limit: int = 50, request_id: str | None = None
    ) -> list[str]:
        """``request_id``: one per call (redis-py's retry of the call re-sends the same)."""
        reply = c.claim_reply(request_id or uuid.uuid4().hex)
        return [str(j) for j in self._claim(keys=[c.DEADLINES, reply], args=[limit, hold_s])]

    def done(self, job_id: str) -> None:
        self._redis.zrem(c.DEADLINES, job_id)

    def due_at(self, job_id: str) -> float | None:
        score = self._redis.zscore(c.DEADLINES, job_id)
        return float(score) if score is not None else None


class OrphanClock:
    """How long each unacked message without a lease has been seen so, on the Redis clock.
    kombu stamps its unacked index with the delivering host's clock; comparing that with this
    host's would restore a message too soon (or too late) whenever the two disagree."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        # The backlog's script does exactly this: first-seen times, others forgotten.
        self._first_seen = register(client, "backlog_first_seen")

    def due(self, tags: list[str], hold_s: float) -> list[str]:
        """The ``tags`` (every unleased unacked message now) seen so for ``hold_s`` or more;
        any tag not given is forgotten (acked, or leased, since)."""
        seen = self._first_seen(keys=[c.ORPHANS_FIRST_SEEN], args=tags)
        seconds, micros = self._redis.time()
        now = seconds + micros / 1_000_000
        return [tag for tag, at in zip(tags, seen, strict=True) if now - float(at) >= hold_s]


class Holdings:
    """What this process holds: its deliveries' lease tokens and image locks. The heartbeat
    renews them; a lock the heartbeat finds taken over is dropped here, and its delivery sees
    that before it pays again (``ImageLocks.token_if_held``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, str] = {}
        self._image_locks: dict[str, Lock] = {}

    def hold_lease(self, task_id: str, token: str) -> None:
        with self._lock:
            self._leases[task_id] = token

    def drop_lease(self, task_id: str, token: str | None = None) -> str | None:
        """Stop renewing a lease; with ``token``, only while it is that delivery's (another
        delivery of the task in this process, a retry received early, keeps its own)."""
        with self._lock:
            if token is not None and self._leases.get(task_id) != token:
                return None
            return self._leases.pop(task_id, None)

    def lease_token(self, task_id: str) -> str | None:
        with self._lock:
            return self._leases.get(task_id)

    def leases(self) -> dict[str, str]:
        with self._lock:
            return dict(self._leases)

    def hold_lock(self, lock: Lock) -> None:
        with self._lock:
            self._image_locks[str(lock.name)] = lock

    def drop_lock(self, lock: Lock) -> None:
        with self._lock:
            self._image_locks.pop(str(lock.name), None)

    def holds_lock(self, lock: Lock) -> bool:
        with self._lock:
            return self._image_locks.get(str(lock.name)) is lock

    def locks(self) -> list[Lock]:
        with self._lock:
            return list(self._image_locks.values())


class _RetrySafeLock(Lock):
    """redis-py's ``Lock``, whose acquire survives its own retry: redis-py re-sends a command
    whose reply was lost (a timeout, a dropped connection), and the re-sent ``SET NX`` finds
    the key set, by the first send, to this very token. Plain ``Lock`` calls that "held by
    someone else", and the image waited a lock lifetime for nobody."""

    def do_acquire(self, token: Any) -> bool:
        if super().do_acquire(token):
            return True
        stored = self.redis.get(self.name)
        if isinstance(stored, str):
            stored = stored.encode()
        return stored is not None and stored == token


class ImageLocks:
    """One delivery at a time per image: redis-py's ``Lock`` with a token per delivery (not per
    thread: the heartbeat renews it from its own thread)."""

    def __init__(self, client: redis.Redis, ttl_s: float, holdings: Holdings) -> None:
        self._redis = client
        self.ttl_s = ttl_s
        self._holdings = holdings

    def try_acquire(self, key: str, wait_s: float = 0.0) -> Lock | None:
        lock = _RetrySafeLock(self._redis, key, timeout=self.ttl_s, sleep=0.1, thread_local=False)
        if not lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s or None):
            return None
        self._holdings.hold_lock(lock)
        return lock

    def expires_in_s(self, key: str) -> float:
        """Seconds until the lock at ``key`` expires unless renewed (0 when it is gone)."""
        return max(0, int(self._redis.pttl(key))) / 1000

    def is_held(self, job_id: str, image_key: str) -> bool:
        """True while some delivery of the image holds its lock."""
        return bool(self._redis.exists(c.JobKeys(job_id).image_lock(image_key)))

    def token_if_held(self, lock: Lock) -> tuple[str, bytes] | None:
        """The lock's key and this delivery's token, for a write to check in the same step
        that the lock is still this delivery's in Redis; None when this process already knows
        it lost the lock (its heartbeat found it taken over)."""
        token = lock.local.token
        if not self._holdings.holds_lock(lock) or token is None:
            return None
        return str(lock.name), token

    def release(self, lock: Lock) -> None:
        self._holdings.drop_lock(lock)
        try:
            lock.release()
        except LockNotOwnedError:
            log.warning("image_lock_was_taken_over", lock=str(lock.name))


class Heartbeat:
    """Renews this process's leases and image locks, on its own thread: nothing it waits on is
    slower than a Redis round trip, so a slow recovery never lets a healthy lease expire."""

    def __init__(self, leases: Leases, holdings: Holdings) -> None:
        self._leases = leases
        self._holdings = holdings
        self.interval_s = max(0.5, leases.ttl_s / 4)

    def beat(self) -> None:
        held = self._holdings.leases()
        for task_id in self._leases.renew(held):
            # Taken over by a newer delivery of the task; that one holds it now.
            if self._holdings.drop_lease(task_id, held[task_id]) is not None:
                log.warning("lease_taken_over", task_id=task_id)
        for lock in self._holdings.locks():
            try:
                lock.reacquire()
            except (LockNotOwnedError, LockError):
                self._holdings.drop_lock(lock)
                log.warning("image_lock_lost", lock=str(lock.name))


_FINALIZING_AT_ONCE = 4


class Watchdog:
    """Sends again the tasks of expired leases and finalizes jobs past their deadline."""

    def __init__(
        self,
        leases: Leases,
        deadlines: Deadlines,
        *,
        resend: Callable[[dict[str, Any]], None],
        finalize_overdue: Callable[[str], None],
        claimer: str,
        rescue_orphans: Callable[[], None] = lambda: None,
    ) -> None:
        self._leases = leases
        self._deadlines = deadlines
        self._resend = resend
        self._finalize_overdue = finalize_overdue
        self._rescue_orphans = rescue_orphans
        self._claimer = claimer
        # A deadline's finalize waits up to 15 s for what runs to stop (worker/stopping.py):
        # each on a thread of its own, so that overdue jobs never hold up the re-sends of lost
        # tasks, and no more at once than _FINALIZING_AT_ONCE, so that a claim is not left
        # waiting here past its hold (another watchdog would finalize the job alongside).
        # Daemon threads: a finalize cut short by the process's exit is one more crash, which
        # the claim's lapse hands to the next watchdog.
        self._overdue: set[str] = set()
        self._overdue_lock = threading.Lock()
        self.interval_s = max(0.5, leases.ttl_s / 4)
        # Long enough to send a message, short enough that a failed re-send is retried soon.
        self._claim_hold_s = max(5.0, leases.ttl_s)

    def patrol(self) -> None:
        for claim in self._leases.claim_expired(self._claimer, hold_s=self._claim_hold_s):
            crash_point("watchdog.after_claim")
            try:
                self._resend(claim.payload)
            except Exception as exc:
                # The claim stays and expires again: the next patrol sends it.
                log.error(
                    "lost_task_resend_failed",
                    task_id=claim.task_id,
                    error=type(exc).__name__,
                    retry_in_s=self._claim_hold_s,
                )
                continue
            crash_point("watchdog.after_resend")
            # Held by the message now: a worker that takes it and dies before leasing it leaves
            # it for the orphan rescue, not for this claim's grace to run out (minutes).
            self._leases.extend(
                claim.task_id, claim.token, self._leases.queued_grace_s, queued=True
            )
            log.warning("lost_task_resent", task_id=claim.task_id, task=claim.payload.get("task"))
        self._rescue_orphans()
        with self._overdue_lock:
            free = _FINALIZING_AT_ONCE - len(self._overdue)
        if free <= 0:
            return
        hold_s = max(60.0, self._claim_hold_s)
        for job_id in self._deadlines.claim_due(hold_s=hold_s, limit=free):
            with self._overdue_lock:
                if job_id in self._overdue:
                    continue  # its claim came due again while its finalize waits: one is enough
                self._overdue.add(job_id)
            threading.Thread(
                target=self._finalize, args=(job_id,), name="refgen_deadline", daemon=True
            ).start()

    def _finalize(self, job_id: str) -> None:
        try:
            self._finalize_overdue(job_id)
        except Exception:
            log.exception("deadline_finalize_crashed", job_id=job_id)
        finally:
            with self._overdue_lock:
                self._overdue.discard(job_id)


class Ticker:
    """Runs ``step`` every ``interval_s`` on a daemon thread until stopped; logs and survives
    any error (Redis restarting, a bad payload)."""

    def __init__(self, name: str, step: Callable[[], None], interval_s: float) -> None:
        self._name, self._step, self._interval_s = name, step, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 0.0) -> None:
        """Stops the ticking; with ``wait_s``, also waits that long for a step under way to end,
        for a caller whose next write must not be overtaken by a late step."""
        self._stop.set()
        if wait_s > 0 and self._thread is not None:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._step()
            except redis.RedisError as exc:
                log.warning(f"{self._name}_redis_unavailable", error=type(exc).__name__)
            except Exception:
                log.exception(f"{self._name}_failed")
