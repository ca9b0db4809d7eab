"""At the provider's limit: three real workers share Replicate's budget, scaled down to 120
creates and 300 other requests a minute, through 60 four-image jobs. Every job succeeds with
one prediction an image, the workers keep to the limit the server enforces (a 429 is rare,
and each one is answered by a back-off shared by every worker), and the rate reached is
printed: a figure, not an assertion, on a shared machine.

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
    assert outcome.predictions == 4 * JOBS  # one paid prediction per image, none repeated
    # The server's limit is kept by the workers' shared budget: it rarely has to refuse
    # (arrivals can bunch on a loaded machine), and every refusal holds every worker back.
    assert outcome.throttled <= JOBS // 12, f"{outcome.throttled} requests answered 429"
    assert outcome.backed_off == outcome.throttled
    span_s = outcome.downloads[-1] - outcome.creates[0]
    images_per_minute = len(outcome.downloads) / span_s * 60
    print(
        f"\n{len(outcome.downloads)} images in {span_s:.1f} s: {images_per_minute:.1f} a minute "
        f"({images_per_minute / CREATES_PER_MINUTE:.1%} of the create limit); "
        f"{outcome.other_requests} other API requests; {outcome.throttled} answered 429"
    )
