"""Lost work, found in seconds: task leases, their heartbeat, and the watchdog.

Each of our tasks holds a lease while it runs (``worker.leases``); a thread in every process
that runs tasks renews them. The same thread is the watchdog: it resends the tasks of expired
leases (their worker died) and finalizes jobs past their deadline. See README, Reliability.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import structlog
from celery import Task, states
from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready

from tasks.app import app, services
from worker import constants as c
from worker.errors import RefgenError
from worker.lifecycle import JobFinalizer

log = structlog.get_logger(__name__)

_OUR_TASKS = frozenset({c.TASK_START, c.TASK_GENERATE, c.TASK_FINALIZE})
_held: set[str] = set()  # leases this process renews
_kept_for_retry: set[str] = set()  # leases handed to a retry message: not released at postrun
_lock = threading.Lock()
_watchdog: threading.Thread | None = None
_stop = threading.Event()


def hold_for_retry(task_id: str, retry_signature: dict[str, Any], delay_s: float) -> None:
    """Keep a retried task covered while its message waits out its countdown."""
    services().leases.hold(task_id, dict(retry_signature), extra_s=delay_s)
    with _lock:
        _held.discard(task_id)
        _kept_for_retry.add(task_id)


@worker_ready.connect
def _watch_from_the_start(**_: Any) -> None:
    # A fresh worker with nothing to do is exactly the one that must find a dead one's work.
    if services().settings.reference_gen_pool != "prefork":
        start_watchdog()


@worker_process_init.connect
def _watch_in_pool_process(**_: Any) -> None:
    start_watchdog()  # prefork: leases are held, and renewed, where tasks run


@task_prerun.connect
def _take_lease(task_id: str, task: Task, **_: Any) -> None:
    if task.name not in _OUR_TASKS:
        return
    start_watchdog()
    services().leases.hold(task_id, dict(task.signature_from_request(task.request)))
    with _lock:
        _held.add(task_id)
        _kept_for_retry.discard(task_id)


@task_postrun.connect
def _drop_lease(task_id: str, task: Task, state: str | None = None, **_: Any) -> None:
    if task.name not in _OUR_TASKS:
        return
    with _lock:
        _held.discard(task_id)
        keep = task_id in _kept_for_retry or state == states.RETRY
        _kept_for_retry.discard(task_id)
    if not keep:
        services().leases.release(task_id)


def start_watchdog() -> None:
    global _watchdog
    with _lock:
        if _watchdog is not None and _watchdog.is_alive():
            return
        _stop.clear()
        _watchdog = threading.Thread(target=_run, name="refgen-watchdog", daemon=True)
        _watchdog.start()


def stop_watchdog() -> None:
    _stop.set()


def _run() -> None:
    interval = max(1.0, services().settings.lease_ttl_s / 4)
    while not _stop.wait(interval):
        try:
            tick()
        except Exception:
            # The watchdog must outlive a Redis restart or a bad payload.
            log.exception("watchdog_tick_failed")


def tick() -> None:
    """One round: renew our leases, resend lost tasks, finalize overdue jobs."""
    s = services()
    with _lock:
        held = list(_held)
    s.leases.renew(held)
    s.locks.renew_held()
    for task_id, payload in s.leases.claim_expired():
        with contextlib.suppress(Exception):
            signature = app.signature(payload)
            signature.apply_async()
            log.warning("lost_task_resent", task_id=task_id, task=payload.get("task"))
    for job_id in s.deadlines.claim_due():
        finalize_overdue(job_id)


def finalize_overdue(job_id: str) -> None:
    try:
        result = JobFinalizer(services()).finalize(job_id, deadline=True)
    except RefgenError as exc:
        log.error("deadline_finalize_failed", job_id=job_id, reason=exc.reason)
        return
    # The result lives under the job id, as if the chord's finalize had run.
    app.backend.store_result(job_id, result, states.SUCCESS)
    log.warning("job_finalized_by_deadline", job_id=job_id)
