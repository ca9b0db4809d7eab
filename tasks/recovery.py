"""Celery's side of ``worker.recovery`` (read that module for the life of a delivery): a lease
taken and released around each delivery of our tasks, the heartbeat and the watchdog started in
every process that runs tasks, and what the watchdog does with a lost task (send it again) or
an overdue job (finalize it and store its result under the job id).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import redis
import structlog
from celery import Task, states
from celery.app.task import Context
from celery.exceptions import Ignore
from celery.signals import (
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
    worker_ready,
)
from kombu.exceptions import OperationalError

from tasks.app import app, services
from tasks.publishing import PUBLISH_ERRORS, publish
from worker import constants as c
from worker import tracing
from worker.crashpoints import fail_point
from worker.errors import DeliveryAbandoned
from worker.fairness import QueueAging
from worker.lifecycle import Cause, JobFinalizer
from worker.recovery import Heartbeat, OrphanClock, Standing, Ticker, Watchdog

log = structlog.get_logger(__name__)

# The oldest unacked messages looked at on each patrol (kombu's index, by delivery time).
_ORPHANS_SCANNED = 200
_OUR_TASKS = frozenset({c.TASK_START, c.TASK_GENERATE, c.TASK_FINALIZE, c.TASK_CANCEL})
_lock = threading.Lock()
_tickers: list[Ticker] = []
_tickers_pid: int | None = None


@worker_ready.connect
def _watch_from_the_start(**_: Any) -> None:
    # A fresh worker with nothing to do is exactly the one that must find a dead one's work.
    # With prefork, this is the parent: it holds the leases of messages it has received until
    # a pool process starts them.
    start_threads()


@worker_process_init.connect
def _watch_in_pool_process(**_: Any) -> None:
    start_threads()  # prefork: leases are held, and renewed, where tasks run


def start_threads() -> None:
    """The heartbeat and the watchdog of this process, each on a thread of its own."""
    global _tickers_pid
    with _lock:
        if _tickers_pid == os.getpid():
            return
        _tickers.clear()
        s = services()
        heartbeat = Heartbeat(s.leases, s.holdings)
        watchdog = Watchdog(
            s.leases,
            s.deadlines,
            resend=resend,
            finalize_overdue=finalize_overdue,
            claimer=f"{socket.gethostname()}:{os.getpid()}",
            rescue_orphans=rescue_orphans,
        )
        _tickers.extend(
            [
                Ticker("refgen_heartbeat", heartbeat.beat, heartbeat.interval_s),
                Ticker("refgen_watchdog", watchdog.patrol, watchdog.interval_s),
            ]
        )
        if s.settings.reference_gen_fairness:
            period = s.settings.reference_gen_aging_s
            aging = QueueAging(s.client, s.settings.reference_gen_queues, period)
            # A quarter of the period: a starved level rises within 1.25 periods.
            _tickers.append(Ticker("refgen_aging", aging.step, period / 4))
        for ticker in _tickers:
            ticker.start()
        _tickers_pid = os.getpid()


def resend(payload: dict[str, Any]) -> None:
    """Send a lost task again, under its own task id."""
    fail_point("watchdog.resend", error=OperationalError)
    publish("publish.resend", lambda: app.signature(payload).apply_async())


def rescue_orphans() -> None:
    """Our messages that a worker took from the broker and died holding before it leased them
    (or while the lease was still a retry's hand-over):
    kombu keeps each in its unacked set until the visibility timeout (10 minutes). One seen
    there with no lease for two lease lifetimes is put back on its queue now (a live worker
    leases a message within milliseconds of taking it), unless a later attempt of its task has
    taken it over: then it is dropped. The time is counted on the Redis clock
    (``OrphanClock``), not against kombu's scores, which the delivering host's clock stamps."""
    s = services()
    with app.pool.acquire(block=True) as connection:
        channel = connection.default_channel
        qos, client = channel.qos, channel.client
        oldest = client.zrange(qos.unacked_index_key, 0, _ORPHANS_SCANNED - 1)
        tags = [t.decode() if isinstance(t, bytes) else str(t) for t in oldest]
        pipe = client.pipeline(transaction=False)
        for tag in tags:
            pipe.hget(qos.unacked_key, tag)
        lost: dict[str, tuple[str, str, Standing]] = {}
        for tag, raw in zip(tags, pipe.execute(), strict=True):
            if raw is None:
                continue  # acked meanwhile
            message, _, _ = json.loads(raw)
            headers = message.get("headers") or {}
            task_id, task = headers.get("id"), headers.get("task")
            if task not in _OUR_TASKS or not task_id:
                continue
            # A retry's hand-over covers the retry while it waits on the broker; once a worker
            # has taken it (it is in the unacked set), that worker leases it within
            # milliseconds, unless it died in between: then only its rescue brings it back
            # before the hand-over's long lease (the queue's grace, minutes) expires. The
            # attempt that handed over is in the unacked set too when its worker died before
            # acknowledging it: its work is done, and run again it would be an attempt more.
            standing = s.leases.standing(task_id, int(headers.get("retries") or 0))
            if standing != "delivered":
                lost[tag] = (task_id, task, standing)
        for tag in OrphanClock(s.client).due(list(lost), hold_s=2 * s.leases.ttl_s):
            task_id, task, standing = lost[tag]
            if standing == "superseded":
                # As kombu acknowledges one: out of the unacked set, not back on a queue.
                client.pipeline().zrem(qos.unacked_index_key, tag).hdel(
                    qos.unacked_key, tag
                ).execute()
                log.warning("superseded_message_dropped", task_id=task_id, task=task)
            else:
                qos.restore_by_tag(tag, client)
                log.warning("orphaned_message_restored", task_id=task_id, task=task)


def finalize_and_store(job_id: str, cause: Cause) -> Any:
    """Finalize a job outside its chord and store its result under the job id, as the chord's
    finalize would. At the deadline, the deadline goes once the result is stored. An image
    task that ends its job early (doomed, or its last outcome) leaves the deadline to the
    chord's finalize, which removes it when it succeeds: should the chord's part return or
    callback fail, Celery stores a ChordError under the job id, and the deadline's finalize
    then stores the committed result over it again."""
    with tracing.span("refgen.finalize_now", job_id=job_id, cause=cause):
        result = JobFinalizer(services()).finalize(job_id, cause=cause)
        publish("publish.result", lambda: app.backend.store_result(job_id, result, states.SUCCESS))
        if cause == "deadline":
            services().deadlines.done(job_id)
    return result


def finalize_overdue(job_id: str) -> None:
    try:
        finalize_and_store(job_id, "deadline")
    except Exception as exc:
        # The claimed deadline comes due again: the next patrol tries again.
        log.error("deadline_finalize_failed", job_id=job_id, error=type(exc).__name__)
        return
    log.warning("job_finalized_by_deadline", job_id=job_id)


def hand_to_retry(task: Task, retry: dict[str, Any], delay_s: float) -> str:
    """Before the retry message is sent, the lease is handed to it: it covers the countdown,
    and if the retry is lost (never sent, or its worker dies during the countdown), the
    watchdog sends it again once the lease expires. Returns the hand-over's token."""
    s = services()
    s.holdings.drop_lease(task.request.id, _token_of(task))
    task.request.refgen_lease_token = None
    return s.leases.take(task.request.id, retry, extra_s=delay_s, queued=True)


def retry_sent(task_id: str, token: str, delay_s: float) -> None:
    """The retry is on the broker: its lease now covers its wait in the queue too, where
    nobody renews it (a worker that receives it takes the lease over, and renews it, or lets
    it expire by dying). Under load the retry waits behind busy slots for as long as their
    images take; a lease of the countdown plus one life would expire meanwhile, and the
    watchdog would send a copy. Only while the hand-over's token is on record: a worker that
    has received the retry already holds the lease with its own."""
    s = services()
    try:
        s.leases.extend(task_id, token, delay_s + s.leases.queued_grace_s)
    except redis.RedisError as exc:
        # The lease still covers the countdown and a life: at worst, a copy is sent.
        log.warning("retry_lease_not_extended", task_id=task_id, error=type(exc).__name__)


ABANDONING: tuple[type[BaseException], ...] = (DeliveryAbandoned, redis.RedisError, *PUBLISH_ERRORS)


@contextlib.contextmanager
def abandoned_as_ignored(task: Task) -> Iterator[None]:
    """A delivery that cannot finish ends without a result, keeping its lease: the lease
    expires and the watchdog sends the task again. ``Ignore`` keeps Celery from counting a
    failure in the chord. Redis out of reach counts, whoever says so: redis-py, kombu (a
    publish) or Celery (a result backend write)."""
    try:
        yield
    except ABANDONING as exc:
        services().holdings.drop_lease(task.request.id, _token_of(task))  # left to expire
        task.request.refgen_lease_token = None
        reason = exc.reason if isinstance(exc, DeliveryAbandoned) else type(exc).__name__
        log.warning("delivery_abandoned", task_id=task.request.id, reason=reason)
        raise Ignore() from None


@task_received.connect
def _lease_on_receipt(request: Any = None, **_: Any) -> None:
    """A message is covered from the moment this worker holds it, not only once it runs: a
    worker that dies between the two (or during a retry's countdown, which it spends holding
    the message) would otherwise leave it to the broker's visibility timeout."""
    if request is None or request.name not in _OUR_TASKS:
        return
    context = Context({**request.request_dict, "chord": request.chord})
    _take(request.id, as_sent(request.task, context))


@task_prerun.connect
def _lease_on_start(task_id: str, task: Task, **_: Any) -> None:
    if task.name not in _OUR_TASKS:
        return
    start_threads()
    token = services().holdings.lease_token(task_id)
    if token is None:  # prefork: the parent received it
        token = _take(task_id, as_sent(task, task.request))
    # This delivery's own token: what it may release, whatever else this process receives.
    task.request.refgen_lease_token = token


def as_sent(task: Task, request: Context) -> dict[str, Any]:
    """The message as the watchdog would send it again, with the summary of its arguments its
    sender gave for task events (``argsrepr``, ``kwargsrepr``; tasks/reference.py ``shown``):
    Celery's signature leaves them out, and the re-sent message would show the image's whole
    spec, prompt and all, in Flower."""
    payload = dict(task.signature_from_request(request))
    shown = {
        name: text[: getattr(app.amqp, f"{name}_maxsize")]  # cut as Celery cuts its own
        for name in ("argsrepr", "kwargsrepr")
        if isinstance(text := getattr(request, name, None), str) and text
    }
    payload["options"] = {**payload.get("options", {}), **shown}
    return payload


def _take(task_id: str, payload: dict[str, Any]) -> str:
    s = services()
    token = s.leases.take(task_id, payload)
    s.holdings.hold_lease(task_id, token)
    return token


def _token_of(task: Task) -> str | None:
    token: str | None = getattr(task.request, "refgen_lease_token", None)
    return token


@task_postrun.connect
def _release_lease(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    if task.name not in _OUR_TASKS:
        return
    s = services()
    token = _token_of(task)
    if token is not None:
        s.holdings.drop_lease(task_id, token)
        # A no-op when a newer delivery holds the lease now.
        s.leases.release(task_id, token)
    if task.name == c.TASK_FINALIZE and state == states.SUCCESS:
        s.deadlines.done(task_id)  # finalize's task id is the job id; its result is stored
