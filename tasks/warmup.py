"""Celery's side of the warm-up (worker/warmup.py): at start, before the first task.

Threads and solo pools warm in the worker's own process once it is ready, and the thread pool
is filled: its threads are otherwise started one by one as the first tasks arrive, each making
its own producer (a broker connection and channel, the queues declared on it) on its first
publish. The result backend is made too, with a connection for each thread: the process has
one (``result_backend_thread_safe``), but Celery makes it on first use, and a probe of the
worker's first job found it made in that job's ``start`` (14 ms: its class looked up among the
installed packages' entry points), then the images, storing their results at once, each
opening a connection to it (issue 23).

A prefork child warms itself as it starts.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Any

import structlog
from celery.signals import worker_process_init, worker_ready
from kombu.common import maybe_declare

from tasks.app import app, services
from worker.settings import get_settings
from worker.warmup import open_connections, warm

log = structlog.get_logger(__name__)
# Each thread waits for the others so that the pool starts them all; never for long.
_BARRIER_S = 5.0


@worker_ready.connect
def _warm_worker(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    if settings.reference_gen_pool == "prefork":
        return
    warm(services(), settings.reference_gen_concurrency)
    _backend(settings.reference_gen_concurrency)
    executor = getattr(getattr(sender, "pool", None), "executor", None)
    if isinstance(executor, Executor):
        fill(executor, settings.reference_gen_concurrency)


@worker_process_init.connect
def _warm_child(**_: Any) -> None:
    if get_settings().reference_gen_pool == "prefork":
        warm(services(), 1)
        _backend(1)
        _thread_warm(None)


def _backend(connections: int) -> None:
    try:
        open_connections(app.backend.client, connections)
    except Exception as exc:  # best effort, as every warm-up step
        log.warning("warmup_step_failed", step="result_backend", error=repr(exc))


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
            for queue in app.amqp.queues.values():  # declared once per producer's connection
                maybe_declare(queue, producer.channel)  # type: ignore[no-untyped-call]
            if barrier is not None:
                barrier.wait()  # held together, so each thread makes a producer of its own
    except Exception as exc:  # best effort: the first publish makes what is missing
        log.warning("warmup_producer_failed", error=repr(exc))
