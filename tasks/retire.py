"""Retiring a worker (``worker.retirement``): once it has taken ``WORKER_MAX_JOBS`` jobs or
grown past ``WORKER_MAX_MEMORY_MB``, a warm shutdown, exactly as a SIGTERM would start one.

Celery's own ``worker_max_tasks_per_child`` and ``worker_max_memory_per_child`` recycle prefork
pool processes only; with the threads pool (the default) the tasks run in the worker itself,
so the worker itself has to go. A warm shutdown stops consuming, lets the running tasks finish
and ack, and returns the messages it reserved but had not started (acks_late) to the queue;
the worker then exits with status 0 and its supervisor starts a fresh one. ``task_received``
runs in the worker's main process whatever the pool, so this works for prefork too, where the
memory read covers the pool's processes.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery.signals import task_received, worker_shutting_down
from celery.worker import state as worker_state

from worker import constants as c
from worker.retirement import RetirementPolicy
from worker.settings import get_settings

log = structlog.get_logger(__name__)

_lock = threading.Lock()
_policy: RetirementPolicy | None = None


def policy() -> RetirementPolicy:
    global _policy
    with _lock:
        if _policy is None:
            # Settings only: a prefork worker's main process builds no clients.
            settings = get_settings()
            _policy = RetirementPolicy(settings.worker_max_jobs, settings.worker_max_memory_mb)
        return _policy


@task_received.connect
def _count_and_maybe_retire(sender: Any = None, request: Any = None, **_: Any) -> None:
    retire = policy().task_taken(starts_job=getattr(request, "name", None) == c.TASK_START)
    if retire is None:
        return
    log.warning(
        "worker_retiring",
        reason=f"this worker {retire.reason}; it finishes what it holds and exits",
        jobs=retire.jobs,
        memory_mb=retire.memory_mb,
    )
    hostname = getattr(sender, "hostname", None)
    worker_shutting_down.send(sender=hostname, sig="retire", how="Warm", exitcode=0)
    # What Celery's SIGTERM handler sets: the consumer loop sees it within a second and
    # raises WorkerShutdown(0), a warm shutdown.
    worker_state.should_stop = 0
