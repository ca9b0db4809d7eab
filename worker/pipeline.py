"""One image, start to finish: budget, generation, upload, cost, events.

Celery-free, so the whole path is testable without a broker. The task layer only turns a
``RetryIn`` into ``Task.retry``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

import structlog

from worker import constants as c
from worker.errors import PermanentError, RefgenError, RetryableError
from worker.events import (
    ImageCompleted,
    ImageFailed,
    ImageRetrying,
    ImageStarted,
    Progress,
    encode,
)
from worker.generation import GenerationRequest
from worker.jobs import MadeImage
from worker.models import ImageOutcome, ImageSpec, money
from worker.retry import generation_retry_delay, storage_call
from worker.services import Services

log = structlog.get_logger(__name__)

# Reserved before each paid call: the pre-flight price of one image (SPEC §6).
RESERVATION_PER_IMAGE = c.FALLBACK_IMAGE_COST * c.ESTIMATE_SAFETY_FACTOR
_WAIT_POLL_S = 0.25


@dataclass(frozen=True)
class RetryIn:
    """Ask the caller to run this image again after ``delay_s``."""

    delay_s: float
    reason: str


def generation_request(spec: ImageSpec, attempt: int, deadline_s: float) -> GenerationRequest:
    return GenerationRequest(
        job_id=spec.job_id,
        image_id=spec.image_id,
        image_key=spec.key,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        seed=spec.seed,
        palette=spec.palette,
        attempt=attempt,
        deadline_s=deadline_s,
    )


class ImagePipeline:
    def __init__(self, services: Services) -> None:
        self._s = services

    def run(self, spec: ImageSpec, attempt: int) -> ImageOutcome | RetryIn:
        """One attempt at one image. A failure comes back as an outcome, never raised."""
        bound = log.bind(job_id=spec.job_id, image=spec.key, attempt=attempt + 1)
        lock_key = c.JobKeys(spec.job_id).image_lock(spec.key)
        token = self._s.locks.acquire(lock_key)
        while token is None:
            # Another delivery of this image is running: its outcome is ours.
            already = self._wait_for_other(spec, lock_key)
            if already is not None:
                bound.info("image_done_by_other_delivery", ok=already.ok)
                return already
            token = self._s.locks.acquire(lock_key)  # the other died: take over
        try:
            return self._run_locked(spec, attempt, bound)
        finally:
            self._s.locks.release(lock_key, token)

    def _wait_for_other(self, spec: ImageSpec, lock_key: str) -> ImageOutcome | None:
        """Wait while another delivery holds the image. Returns its outcome, or None once its
        lock is gone without one (it died)."""
        while True:
            outcome = self._s.jobs.stored_outcome(spec.job_id, spec.key)
            if outcome is not None:
                return outcome
            if not self._s.client.exists(lock_key):
                return self._s.jobs.stored_outcome(spec.job_id, spec.key)
            time.sleep(_WAIT_POLL_S)

    def _run_locked(
        self, spec: ImageSpec, attempt: int, bound: structlog.typing.FilteringBoundLogger
    ) -> ImageOutcome | RetryIn:
        already = self._s.jobs.stored_outcome(spec.job_id, spec.key)
        if already is not None:
            # Redelivered after the outcome was recorded: nothing to pay, upload or announce.
            bound.info("image_already_done", ok=already.ok)
            return already
        if attempt == 0:
            self._s.events.publish(
                spec.job_id,
                ImageStarted(
                    image_type=spec.image_type,
                    image_id=spec.image_id,
                    current_image=spec.index,
                    total_images=spec.total,
                ),
            )
        try:
            outcome = self._make(spec, attempt)
        except RetryableError as exc:
            delay = generation_retry_delay(exc, attempt)
            if delay is not None:
                bound.warning("image_retry", reason=exc.reason, retry_in_s=delay)
                self._s.events.publish(
                    spec.job_id,
                    ImageRetrying(
                        image_type=spec.image_type,
                        image_id=spec.image_id,
                        retry_count=attempt + 1,
                        max_retries=c.GENERATION_MAX_ATTEMPTS - 1,
                        reason=exc.reason,
                        retry_in_s=delay,
                    ),
                )
                return RetryIn(delay_s=delay, reason=exc.reason)
            outcome = self._failure(spec, attempt, exc)
        except PermanentError as exc:
            outcome = self._failure(spec, attempt, exc)
        except Exception:
            # A bug must not take the chord down with it: finalize still needs this image.
            bound.exception("image_internal_error")
            outcome = self._failure(
                spec, attempt, RefgenError("Internal error while making the image")
            )
        return self.conclude(spec, outcome)

    def _make(self, spec: ImageSpec, attempt: int) -> ImageOutcome:
        s = self._s
        made = s.jobs.made(spec.job_id, spec.key)
        if made is not None and storage_call(lambda: s.store.exists(spec.storage_path)):
            # Paid for and stored by a delivery that died before recording it: reuse it.
            log.info("image_reused_from_store", job_id=spec.job_id, image=spec.key)
            return self._stored(spec, attempt, made.generation_time, Decimal(made.cost))
        s.ledger.reserve(spec.job_id, spec.key, RESERVATION_PER_IMAGE)
        try:
            generated = s.generator.generate(
                generation_request(spec, attempt, s.settings.image_timeout_s)
            )
        except BaseException:
            s.ledger.release(spec.job_id, spec.key)
            raise
        if generated.cost_is_fallback:
            log.warning(
                "cost_fallback_used",
                job_id=spec.job_id,
                image=spec.key,
                cost=money(generated.cost),
            )
        # Charged before the upload: the provider has billed us whatever happens next, and
        # the charge is keyed by image, so a retried upload cannot charge again.
        cost = s.ledger.charge(spec.job_id, spec.key, generated.cost)
        s.jobs.note_made(spec.job_id, spec.key, MadeImage(generated.generation_time, money(cost)))
        storage_call(lambda: s.store.put_png(spec.storage_path, generated.png))
        log.info(
            "image_stored",
            job_id=spec.job_id,
            image=spec.key,
            cost=money(cost),
            generation_time=generated.generation_time,
        )
        return self._stored(spec, attempt, generated.generation_time, cost)

    def _stored(
        self, spec: ImageSpec, attempt: int, generation_time: float, cost: Decimal
    ) -> ImageOutcome:
        url = storage_call(lambda: self._s.store.signed_url(spec.storage_path))
        return ImageOutcome(
            image_type=spec.image_type,
            image_id=spec.image_id,
            ok=True,
            prompt_used=spec.prompt,
            image_url=url,
            generation_time=generation_time,
            cost=cost,
            retry_count=attempt,
        )

    def _failure(self, spec: ImageSpec, attempt: int, error: RefgenError) -> ImageOutcome:
        log.warning(
            "image_failed",
            job_id=spec.job_id,
            image=spec.key,
            reason=error.reason,
            error=type(error).__name__,
        )
        paid = self._s.ledger.charges(spec.job_id).get(spec.key, Decimal(0))
        return ImageOutcome(
            image_type=spec.image_type,
            image_id=spec.image_id,
            ok=False,
            prompt_used=spec.prompt,
            cost=paid,
            retry_count=attempt,
            reason=error.reason,
        )

    def conclude(self, spec: ImageSpec, outcome: ImageOutcome) -> ImageOutcome:
        """Record the outcome once and announce it. Returns the outcome on record."""
        event: ImageCompleted | ImageFailed
        if outcome.ok:
            assert outcome.image_url is not None
            event = ImageCompleted(
                image_type=spec.image_type,
                image_id=spec.image_id,
                image_url=outcome.image_url,
                generation_time=outcome.generation_time,
                cost=outcome.cost,
                retry_count=outcome.retry_count,
                completed_images=0,  # filled in as the outcome is recorded
                total_images=spec.total,
            )
        else:
            event = ImageFailed(
                image_type=spec.image_type,
                image_id=spec.image_id,
                retry_count=outcome.retry_count,
                reason=outcome.reason or "Unknown failure",
            )
        stored, _ = self._s.jobs.record_outcome(
            spec.job_id,
            spec.key,
            outcome,
            total=spec.total,
            announcements=[encode(event), encode(Progress(progress=0))],
        )
        return stored
