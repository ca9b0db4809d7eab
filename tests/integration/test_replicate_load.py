"""At the provider's limit: three real workers share Replicate's budget, scaled down to 120
creates and 300 other requests a minute, through 60 four-image jobs. Every job succeeds, the
server never has to answer 429, and images are made at ≥ 90 % of the create limit.

The run (``provider_limit.py``) takes over two minutes, all but seconds of it waiting at the
limit, so it starts with the session and runs beside the other tests."""

from __future__ import annotations

import pytest

from tests.integration.provider_limit import CREATES_PER_MINUTE, JOBS

pytestmark = [pytest.mark.integration, pytest.mark.load, pytest.mark.timeout(420)]


def test_sixty_jobs_at_the_providers_limit(provider_limit) -> None:
    outcome = provider_limit.result(timeout=400)
    assert outcome.failures == []
    assert outcome.statuses == ["success"] * JOBS
    assert outcome.throttled == 0, "the workers went over a limit the server enforces"
    assert len(outcome.creates) == 4 * JOBS  # one create per image, none repeated
    span_s = outcome.downloads[-1] - outcome.creates[0]
    images_per_minute = len(outcome.downloads) / span_s * 60
    print(
        f"\n{len(outcome.downloads)} images in {span_s:.1f} s: {images_per_minute:.1f} a minute "
        f"({images_per_minute / CREATES_PER_MINUTE:.1%} of the create limit); "
        f"{outcome.other_requests} other API requests"
    )
    assert images_per_minute >= 0.9 * CREATES_PER_MINUTE
    assert images_per_minute <= CREATES_PER_MINUTE * 1.02  # and never above it
