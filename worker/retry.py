"""Every retry policy of the worker, in one place. Each retry is logged."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog
import tenacity

from worker import constants as c
from worker.errors import RetryableError
from worker.timebox import remaining

log = structlog.get_logger(__name__)
_T = TypeVar("_T")


def generation_retry_delay(error: RetryableError, attempt: int) -> float | None:
    """Seconds until the next attempt of an image, or None when it has had its two.

    The delay is exactly 2 s, or a provider's ``Retry-After`` when that is longer (capped, so
    a slot never waits minutes on one image). No jitter: the design promises 2 s.
    """
    if attempt + 1 >= c.GENERATION_MAX_ATTEMPTS:
        return None
    delay = c.GENERATION_RETRY_DELAY_S
    if error.retry_after_s is not None:
        delay = max(delay, min(error.retry_after_s, c.RETRY_AFTER_CAP_S))
    return delay


def _log_storage_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "storage_retry",
        attempt=state.attempt_number,
        max_attempts=c.STORAGE_MAX_ATTEMPTS,
        sleep_s=round(state.next_action.sleep, 2) if state.next_action else None,
        reason=getattr(error, "reason", type(error).__name__),
    )


class _past_image_deadline(tenacity.stop.stop_base):
    """Stop when the next attempt would start after the image's deadline (``worker.timebox``)."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        left = remaining()
        return left is not None and left <= retry_state.upcoming_sleep


def storage_call(fn: Callable[[], _T], *, initial_wait_s: float = 0.5) -> _T:
    """Run a storage call with three attempts and exponential backoff on transient errors
    (SPEC §5), within the image's deadline. Permanent errors pass straight through."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_any(
            tenacity.stop_after_attempt(c.STORAGE_MAX_ATTEMPTS), _past_image_deadline()
        ),
        wait=tenacity.wait_exponential(multiplier=initial_wait_s, max=8),
        retry=tenacity.retry_if_exception_type(RetryableError),
        before_sleep=_log_storage_retry,
        reraise=True,
    )
    return retrying(fn)
