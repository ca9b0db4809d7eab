"""``refgen worker`` with one more remote-control command, for tests only: ``results_held``
reports what the worker's result backends hold for results it might wait on.

Celery's app keeps one backend per thread, so the command finds them all through the garbage
collector rather than ``app.backend`` (which would be the consumer thread's alone).
Run as ``python -m tests.integration.inspected_worker worker --hostname ...``.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from celery.backends.redis import RedisBackend
from celery.worker.control import inspect_command

from tasks.cli import main


@inspect_command()
def results_held(state: Any) -> dict[str, int]:
    held = {"backends": 0, "pending_results": 0, "subscribed": 0, "unread_unsubscribes": 0}
    for backend in [o for o in gc.get_objects() if isinstance(o, RedisBackend)]:
        held["backends"] += 1
        pending = getattr(backend, "_pending_results", ({}, {}))
        # Task ids still mapped, and the result objects waiting on them.
        held["pending_results"] += sum(len(m) + sum(len(w) for w in m.values()) for m in pending)
        consumer = getattr(backend, "result_consumer", None)
        held["subscribed"] += len(getattr(consumer, "subscribed_to", ()) or ())
        pubsub = getattr(consumer, "_pubsub", None)
        if pubsub is not None:
            held["unread_unsubscribes"] += len(pubsub.pending_unsubscribe_channels)
    return held


if __name__ == "__main__":
    sys.exit(main())
