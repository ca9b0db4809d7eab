"""Celery's side of the warm-up (worker/warmup.py): at start, before the first task.

Threads and solo pools warm in the worker's own process once it is ready, and the thread pool
is filled: its threads are otherwise started one by one as the first tasks arrive, each making
its own producer (a broker connection and channel) on its first publish. A prefork child warms
itself as it starts.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Any

import structlog
from celery.signals import worker_process_init, worker_ready

from tasks.app import app, services
from worker.settings import get_settings
from worker.warmup import warm

log = structlog.get_logger(__name__)
# Each thread waits for the others so that the pool starts them all; never for long.
_BARRIER_S = 5.0


@worker_ready.connect
def _warm_worker(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.reference_gen_pool == "prefork":
        return
    warm(services(), settings.reference_gen_concurrency)
    executor = getattr(getattr(sender, "pool", None), "executor", None)
    if isinstance(executor, Executor):
        fill(executor, settings.reference_gen_concurrency)


@worker_process_init.connect
def _warm_child(**_: Any) -> None:
    if get_settings().reference_gen_pool == "prefork":
        warm(services(), 1)
        _thread_warm(None)


def fill(executor: Executor, threads: int) -> None:
    """Start ``threads`` of the pool's threads now, each with its producer ready."""
    limit = app.conf.broker_pool_limit or threads
    barrier = threading.Barrier(min(threads, limit), timeout=_BARRIER_S)
    for _ in range(min(threads, limit)):
        executor.submit(_thread_warm, barrier)


def _thread_warm(barrier: threading.Barrier | None) -> None:
    try:
        with app.producer_pool.acquire(block=True, timeout=_BARRIER_S) as producer:
            producer.channel  # noqa: B018 - connects it, and its channel
            if barrier is not None:
                barrier.wait()  # held together, so each thread makes a producer of its own
    except Exception as exc:  # best effort: the first publish makes what is missing
        log.warning("warmup_producer_failed", error=repr(exc))
