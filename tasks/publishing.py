"""Sending a message through a broker that may be gone for a moment.

A publish while Redis is unreachable raises kombu's ``OperationalError`` once kombu's own
retries (``task_publish_retry_policy``) give up; a write to the result backend, Celery's
``BackendError`` once ``result_backend_always_retry`` gives up. A Redis restart or a Sentinel
failover takes seconds, so each of our publishes is tried again for up to ``PUBLISH_FOR_S``;
if the broker is still away, the error leaves the delivery, which keeps its lease
(``tasks.recovery.abandoned_as_ignored``) for the watchdog to send its task again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
import structlog
import tenacity
from celery.app.amqp import AMQP
from celery.exceptions import BackendError, Reject
from kombu.exceptions import OperationalError

from worker.crashpoints import crash_point, fail_point

log = structlog.get_logger(__name__)

T = TypeVar("T")

# What a publish or a backend write raises when Redis is away (redis-py's own when a caller
# reaches the client without kombu or Celery in between).
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    BackendError,
    redis.ConnectionError,
    redis.TimeoutError,
)
PUBLISH_FOR_S = 10.0


def publish(point: str, send: Callable[[], T]) -> T:
    """``send()``, again while it fails for want of the broker, for up to ``PUBLISH_FOR_S``.
    ``point`` names it for the test-only fail switch, which raises kombu's
    ``OperationalError`` there, as a publish with the broker gone does."""

    def attempt() -> T:
        fail_point(point, error=OperationalError)
        try:
            return send()
        except Reject as exc:
            # Celery's Task.retry wraps its publish's failure in Reject(requeue=False), which
            # would fail the task and its chord: the publish's own error is what counts.
            if isinstance(exc.reason, PUBLISH_ERRORS):
                raise exc.reason from None
            raise

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(PUBLISH_ERRORS),
        wait=tenacity.wait_exponential(multiplier=0.2, max=1.0),
        stop=tenacity.stop_after_delay(PUBLISH_FOR_S),
        before_sleep=lambda state: log.warning(
            "publish_retried",
            point=point,
            error=type(state.outcome.exception()).__name__ if state.outcome else None,
            attempt=state.attempt_number,
        ),
        reraise=True,
    )
    return retrying(attempt)


class RetriedCallbackAMQP(AMQP):  # type: ignore[misc]
    """Celery's messaging, but a chord's callback (our ``finalize``) is published with the
    same retries as ours. The Redis backend sends it through ``_retry_publish`` once the last
    image is in; a failure there stores a ``ChordError`` under the job id (the callback's id)
    and the job would end only at its deadline. ``tests/unit/test_publishing.py`` pins the
    hook, so a Celery upgrade that renames it fails there."""

    def _retry_publish(self, send: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        crash_point("publish.callback")
        parent = super()._retry_publish
        return publish("publish.callback", lambda: parent(send, *args, **kwargs))
