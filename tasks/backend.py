"""The result backend of refgen's processes: Celery's Redis backend without its pub/sub
result consumer.

Celery's Redis backend is "async": every ``AsyncResult`` a process creates through
``then()`` is registered as a pending result (``AsyncBackendMixin.add_pending_result``) and
its ``celery-task-meta-*`` channel subscribed, to be resolved when a message arrives on it.
Only a process that drains the consumer while waiting on ``get()`` ever resolves them, and a
worker never does. Launching a chord registers each header task twice
(``RedisBackend.apply_chord`` builds a ``GroupResult`` whose barrier holds every result
strongly; ``group._apply_tasks`` adds a weak one), so every job left four results and four
subscribed channels in the worker for good: four channels and 5 to 8 KB a job (``bench/soak.py``
with refgen, ``bench/plain_chord.py`` with a plain Celery app).

Releasing them after the launch does not help enough: ``remove_pending_result`` cannot reach
the strong references, and an UNSUBSCRIBE whose reply is never read stays in redis-py's
``pending_unsubscribe_channels`` and in the socket (celery/celery#6963). So this backend
registers nothing and subscribes to nothing: Celery's ``SyncBackendMixin`` (what its
non-pub/sub backends use) makes ``add_pending_result`` a no-op and ``get()`` poll the result
key. Storing results, chord counting and expiry are the Redis backend's own, unchanged.
"""

from __future__ import annotations

from typing import Any

from celery.backends.base import SyncBackendMixin
from celery.backends.redis import RedisBackend, SentinelBackend


class _Polling(SyncBackendMixin):  # type: ignore[misc]
    def on_task_call(self, producer: Any, task_id: str) -> None:
        # The Redis backend subscribes to a task's channel as it is sent, unless the caller
        # is a worker's pool thread; a watchdog or a client sending tasks would subscribe too.
        return None


class PollingRedisBackend(_Polling, RedisBackend):  # type: ignore[misc]
    """``result_backend = "tasks.backend:PollingRedisBackend+redis://..."``."""


class PollingSentinelBackend(_Polling, SentinelBackend):  # type: ignore[misc]
    """``result_backend = "tasks.backend:PollingSentinelBackend+sentinel://...;sentinel://..."``
    with ``result_backend_transport_options = {"master_name": ...}``."""
