"""The delay before an image's second attempt: 2 s, or a longer ``Retry-After`` up to 30 s."""

from __future__ import annotations

import pytest

from worker import constants as c
from worker.errors import ImageTimeoutError, RateLimitedError, RetryableError
from worker.retry import generation_retry_delay


@pytest.mark.parametrize(
    ("retry_after_s", "delay_s"),
    [
        (None, 2.0),  # no Retry-After: the design's 2 s
        (1.0, 2.0),  # shorter than 2 s: still 2 s
        (3.0, 3.0),  # longer: honoured
        (120.0, 30.0),  # far longer: capped, a slot never idles for minutes
    ],
)
def test_first_attempt_waits_2_s_or_a_longer_retry_after_capped(
    retry_after_s: float | None, delay_s: float
) -> None:
    error = RateLimitedError("Rate limited by Replicate", retry_after_s=retry_after_s)
    assert generation_retry_delay(error, attempt=0) == delay_s


def test_the_last_attempt_gets_no_retry() -> None:
    last = c.GENERATION_MAX_ATTEMPTS - 1
    for error in (
        RateLimitedError("Rate limited by Replicate", retry_after_s=3.0),
        ImageTimeoutError("Timed out after 120 s"),
        RetryableError("Replicate is having trouble (HTTP 503)"),
    ):
        assert generation_retry_delay(error, attempt=last) is None
    assert generation_retry_delay(RetryableError("x"), attempt=last + 1) is None
