"""The worker's heartbeat for operators (worker/presence.py): from the moment it is ready until
it stops cleanly, the worker's main process notes that it is alive, under Celery's name for it."""

from __future__ import annotations

from typing import Any

import redis
import structlog
from celery.signals import worker_ready, worker_shutdown

from tasks.app import services
from worker.presence import WorkerPresence
from worker.recovery import Ticker

log = structlog.get_logger(__name__)
_running: list[tuple[WorkerPresence, Ticker]] = []


@worker_ready.connect
def _beat_while_running(sender: Any = None, **_: Any) -> None:
    s = services()
    presence = WorkerPresence(s.client, str(getattr(sender, "hostname", "unknown")))
    presence.beat()  # at once: a fresh worker is alive before its first interval
    ticker = Ticker("refgen_presence", presence.beat, max(0.5, s.settings.lease_ttl_s / 4))
    ticker.start()
    _running.append((presence, ticker))


@worker_shutdown.connect
def _say_goodbye(**_: Any) -> None:
    while _running:
        presence, ticker = _running.pop()
        # A beat under way when the worker stops would land after the goodbye and list the
        # stopped worker again: let it end first.
        ticker.stop(wait_s=5)
        try:
            presence.gone()
        except redis.RedisError as exc:
            # Redis away at shutdown: the entry ages out instead, as a dead worker's would.
            log.warning("worker_presence_not_removed", error=type(exc).__name__)
