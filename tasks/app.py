"""The Celery app, and the clients each worker process builds once."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import structlog
from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    before_task_publish,
    worker_init,
    worker_process_init,
)

from tasks import exit_codes
from worker import constants as c
from worker import scripts
from worker.errors import ConfigurationError, RefgenError
from worker.logging import configure_logging, format_as_json, install_redaction
from worker.services import Services
from worker.settings import Settings, get_settings

app = Celery(
    "reference_generator",
    include=[
        "tasks.reference",
        "tasks.retire",
        "tasks.presence",
        "tasks.tracing",
        "tasks.warmup",
    ],
    # A chord's callback published with our retries (tasks/publishing.py).
    amqp="tasks.publishing:RetriedCallbackAMQP",
)
app.config_from_object("celeryconfig")

log = structlog.get_logger(__name__)
_lock = threading.Lock()
_services: Services | None = None
_services_pid: int | None = None


def services() -> Services:
    """This process's clients. Built once per process: a forked child builds its own rather
    than inherit sockets from its parent."""
    global _services, _services_pid
    if _services is None or _services_pid != os.getpid():
        with _lock:
            if _services is None or _services_pid != os.getpid():
                _services = Services.build(get_settings())
                _services_pid = os.getpid()
                _prepare(_services)
    return _services


def _prepare(built: Services) -> None:
    try:
        built.store_readiness.check()
    except RefgenError as exc:
        # Not fatal: the store is checked again before each paid call until it answers.
        log.warning("bucket_check_failed", reason=exc.reason, checked_again="before each image")


@worker_process_init.connect
def _build_in_child(**_: Any) -> None:
    services()


def check_worker_can_run(settings: Settings) -> None:
    """What a worker needs before it takes a task: the settings of the backends it will use,
    and every Lua script (package data that a broken build leaves out: every job would fail).
    Raises ``ConfigurationError``."""
    settings.check_backends()
    scripts.load_all()


@worker_init.connect
def _build_in_worker(sender: Any = None, **_: Any) -> None:
    settings = get_settings()
    try:
        # However the worker was started (`refgen worker` checks first, `celery -A tasks.app
        # worker` does not), it takes no task it could not run.
        check_worker_can_run(settings)
    except ConfigurationError as exc:
        log.error("worker_refused_to_start", reason=exc.reason)
        raise SystemExit(exit_codes.CONFIGURATION) from None
    # Threads and solo pools have no child processes, so no worker_process_init.
    if settings.reference_gen_pool != "prefork":
        services()


@before_task_publish.connect
def _stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Celery's messages carry no send time; the backlog's "oldest waiting message" needs one
    # (worker/backlog.py). A re-sent message (a retry, the watchdog's) waits from its re-send.
    if headers is not None:
        headers[c.SENT_AT_HEADER] = time.time()


@after_setup_logger.connect
def _setup_logging(logger: logging.Logger, **_: Any) -> None:
    configure_logging(get_settings())


@after_setup_task_logger.connect
def _setup_task_logging(logger: logging.Logger, **_: Any) -> None:
    # Celery sets its task loggers up after the root's, with handlers of their own.
    settings = get_settings()
    install_redaction(settings, [logger])
    format_as_json(settings)
