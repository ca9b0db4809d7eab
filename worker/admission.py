"""Defence in depth on the broker: an image is made only as its admitted job planned it.

Whoever can write to the broker can send ``generate_reference`` directly, skipping ``start``
(validation, the budget pre-flight, the job's ledger). Before anything is paid, an image's
spec must be exactly one of the images its job stored when it was admitted (the job's meta,
written by ``start`` before the chord is sent): a job that was never admitted, an image not
in its plan, or a planned image with another prompt, seed or job is refused, and logged.
"""

from __future__ import annotations

import structlog

from worker.jobs import JobStore
from worker.models import ImageOutcome, ImageSpec

log = structlog.get_logger(__name__)


def refusal(jobs: JobStore, spec: ImageSpec) -> ImageOutcome | None:
    """None for an image of an admitted job's plan; otherwise the failed outcome to end the
    message with (nothing recorded in the job, nothing announced, nothing paid)."""
    meta = jobs.meta(spec.job_id)
    if meta is None:
        reason = "Refused: the job was not admitted (no plan on record); nothing was paid"
    else:
        planned = next((image for image in meta.images if image.key == spec.key), None)
        if planned is None:
            reason = "Refused: the image is not in its job's plan; nothing was paid"
        elif planned != spec:
            reason = "Refused: the image differs from its job's plan; nothing was paid"
        else:
            return None
    # The job id and key as sent, cut: they are the sender's text, not ours.
    log.error("image_refused", job_id=spec.job_id[:80], image=spec.key[:80], reason=reason)
    return ImageOutcome(
        image_type=spec.image_type,
        image_id=spec.image_id,
        ok=False,
        prompt_used="",  # never echo a prompt the plan did not hold
        reason=reason,
    )
