"""Stopping a job's spending: one way for every end that comes before its images do (an
early stop, a cancel, the deadline).

Images not started are recorded failed, so that a late delivery of one stops at its state
check; the job's predictions are marked cancelled, so that no delivery can write an intent,
hence create, from now on (one waiting for the request budget included); the predictions in
flight are cancelled on Replicate, and their deliveries, which charge what ran before they
record an outcome, are waited for within bounds. The committed cost is then what was billed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from worker.events import Progress, encode
from worker.models import ImageSpec
from worker.pipeline import failed_outcome, generation_request, outcome_event
from worker.services import Services

log = structlog.get_logger(__name__)

# How long a stopping job waits for its images in flight to stop (their predictions are
# cancelled), so that the final cost includes what they ran.
SETTLE_S = 15.0


def stop_spending(
    services: Services,
    job_id: str,
    planned: Sequence[ImageSpec],
    *,
    skipped: str,
    stopped: str,
    settle_s: float = SETTLE_S,
) -> None:
    """Stop every image of the job without an outcome: ``skipped`` is the reason of those not
    started, ``stopped`` of those whose delivery did not record an outcome in time."""
    s = services
    recorded = s.jobs.outcomes(job_id)
    waiting = [spec for spec in planned if spec.key not in recorded]
    if not waiting:
        return
    running = [spec for spec in waiting if s.locks.is_held(job_id, spec.key)]
    idle = [spec for spec in waiting if spec not in running]
    fail_missing(s, job_id, idle, skipped)
    # Called even with nothing running: it also closes the door on creates to come.
    cancelled = s.generator.cancel_in_flight(
        job_id, [generation_request(spec, 0, s.settings.image_timeout_s) for spec in running]
    )
    if running:
        log.warning("job_predictions_stopped", job_id=job_id, predictions=cancelled)
    settle_by = time.monotonic() + settle_s
    while running and time.monotonic() < settle_by:
        recorded = s.jobs.outcomes(job_id)
        if all(spec.key in recorded for spec in running):
            return
        time.sleep(0.1)
    fail_missing(s, job_id, running, stopped)


def fail_missing(
    services: Services, job_id: str, planned: Sequence[ImageSpec], reason: str
) -> None:
    """Record a failure for every planned image with no outcome, so that a late delivery
    of it stops instead of paying."""
    recorded = services.jobs.outcomes(job_id)
    for spec in planned:
        if spec.key in recorded:
            continue
        outcome = failed_outcome(services, spec, reason)
        services.jobs.record_outcome(
            job_id,
            spec.key,
            outcome,
            announcements=[encode(outcome_event(spec, outcome)), encode(Progress(progress=0))],
        )
