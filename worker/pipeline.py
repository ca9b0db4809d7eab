"""One image, start to finish: budget, generation, upload, cost, events.

Celery-free, so the whole path is testable without a broker. The task layer turns a
``RetryIn`` into ``Task.retry`` and a ``DeliveryAbandoned`` into a delivery that leaves its
task to its lease (``worker.recovery``).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import redis
import structlog
from redis.lock import Lock

from worker import constants as c
from worker import tracing
from worker.crashpoints import crash_point
from worker.errors import (
    CancelledError,
    DeliveryAbandoned,
    PermanentError,
    RefgenError,
    RetryableError,
    StoreRefusedError,
)
from worker.events import (
    ImageCompleted,
    ImageFailed,
    ImageRetrying,
    ImageStarted,
    Progress,
    encode,
)
from worker.generation import GenerationRequest
from worker.jobs import DoomReason, MadeImage, Recorded
from worker.models import ImageOutcome, ImageSpec, money
from worker.retry import generation_retry_delay, storage_call
from worker.services import Services
from worker.timebox import attempt_deadline

log = structlog.get_logger(__name__)

# Reserved before each paid call: the pre-flight price of one image (SPEC §6).
RESERVATION_PER_IMAGE = c.FALLBACK_IMAGE_COST * c.ESTIMATE_SAFETY_FACTOR

_WHY_DOOMED = {
    "scenes": "every scene image failed",
    "characters": "every character image failed",
    "half": "fewer than half of the images can still be made",
}


def skipped_reason(doom: DoomReason) -> str:
    if doom == "cancelled":
        return "Not made: the job was cancelled"
    return (
        f"Not made, to save money: {_WHY_DOOMED[doom]}, so this job goes text-only "
        "whatever this image does"
    )


def cancelled_reason(doom: DoomReason) -> str:
    if doom == "cancelled":
        return "Stopped while it was being made: the job was cancelled"
    return (
        f"Cancelled, to save money: {_WHY_DOOMED[doom]}, so this job goes text-only "
        "whatever this image does"
    )


@dataclass(frozen=True)
class RetryIn:
    """Ask the caller to run this image again after ``delay_s``."""

    delay_s: float
    reason: str


@dataclass(frozen=True)
class HeldElsewhere:
    """Another delivery of this image holds its lock (this one is a copy: a re-send, a
    redelivery): ask the caller to look again, as the same attempt, after ``check_in_s``,
    when that lock would have expired were its holder dead. Nothing was recorded or paid."""

    check_in_s: float


Step = Recorded | RetryIn | HeldElsewhere


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

    def run(self, spec: ImageSpec, attempt: int) -> Step:
        """One attempt at one image. A failure comes back as an outcome, never raised.

        Raises ``DeliveryAbandoned`` when this delivery cannot finish the image: Redis is
        unreachable (nothing could be recorded)."""
        try:
            lock = self._lock(spec)
            if isinstance(lock, ImageOutcome):
                return Recorded(lock, is_new=False)
            if isinstance(lock, HeldElsewhere):
                return lock
            try:
                return self._run_locked(spec, attempt, lock)
            finally:
                self._s.locks.release(lock)
        except redis.RedisError as exc:
            raise DeliveryAbandoned(f"Redis is unreachable ({type(exc).__name__})") from None

    def _lock(self, spec: ImageSpec) -> Lock | ImageOutcome | HeldElsewhere:
        """This image's lock; or the outcome another delivery recorded; or, while another
        delivery holds the lock, when to look again. Never a wait for the other delivery:
        its attempt may take minutes, and this one would hold a worker slot all along."""
        key = c.JobKeys(spec.job_id).image_lock(spec.key)
        lock = self._s.locks.try_acquire(key, wait_s=0.25)
        if lock is not None:
            return lock
        other = self._s.jobs.stored_outcome(spec.job_id, spec.key)
        if other is not None:
            log.info("image_done_by_other_delivery", job_id=spec.job_id, image=spec.key)
            return other
        # Its holder renews it every quarter of its life: look again when it would have
        # expired were the holder dead (then this delivery takes the image over).
        check_in_s = self._s.locks.expires_in_s(key) + 0.5
        log.info(
            "image_held_by_other_delivery",
            job_id=spec.job_id,
            image=spec.key,
            check_in_s=round(check_in_s, 1),
        )
        return HeldElsewhere(check_in_s)

    def _run_locked(self, spec: ImageSpec, attempt: int, lock: Lock) -> Recorded | RetryIn:
        bound = log.bind(job_id=spec.job_id, image=spec.key, attempt=attempt + 1)
        state = self._s.jobs.image_state(spec.job_id, spec.key)
        if state.outcome is not None:
            # Redelivered after the outcome was recorded: nothing to pay, upload or announce.
            bound.info("image_already_done", ok=state.outcome.ok)
            return Recorded(state.outcome, is_new=False)
        if state.doomed is not None:
            return self.conclude(spec, self._failure(spec, attempt, skipped_reason(state.doomed)))
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
            with attempt_deadline(self._s.settings.image_timeout_s):
                outcome = self._make(spec, attempt, lock, state.made)
        except RetryableError as exc:
            delay = generation_retry_delay(exc, attempt)
            if delay is None:
                outcome = self._failure(spec, attempt, exc.reason)
            else:
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
        except CancelledError as exc:
            doom = self._s.jobs.doomed(spec.job_id)
            reason = cancelled_reason(doom) if doom is not None else exc.reason
            outcome = self._failure(spec, attempt, reason)
        except PermanentError as exc:
            outcome = self._failure(spec, attempt, exc.reason)
        except (DeliveryAbandoned, redis.RedisError):
            raise
        except Exception:
            # A bug must not take the chord down with it: finalize still needs this image.
            bound.exception("image_internal_error")
            outcome = self._failure(spec, attempt, "Internal error while making the image")
        return self.conclude(spec, outcome)

    def _make(
        self, spec: ImageSpec, attempt: int, lock: Lock, made: MadeImage | None
    ) -> ImageOutcome:
        s = self._s
        if made is not None and storage_call(lambda: s.store.exists(spec.storage_path)):
            # Paid for and stored by a delivery that died before recording it: reuse it.
            log.info("image_reused_from_store", job_id=spec.job_id, image=spec.key)
            cost = s.ledger.image_costs(spec.job_id).get(spec.key, Decimal(0))
            return self._stored(spec, attempt, made.generation_time, cost)
        # Everything that could make the paid call pointless is checked before it (a job
        # doomed since is stopped by the cancellation of its predictions).
        with tracing.span("refgen.prepare"):
            s.store_readiness.check()
            # Reserved only while the lock is this delivery's in Redis too, in the same step.
            held = s.locks.token_if_held(lock)
            if held is None or not s.ledger.reserve(
                spec.job_id, spec.key, RESERVATION_PER_IMAGE, while_held=held
            ):
                raise DeliveryAbandoned("another delivery took this image over")
        crash_point("image.after_reservation")
        try:
            with tracing.span("refgen.generate"):
                generated = s.generator.generate(
                    generation_request(spec, attempt, s.settings.image_timeout_s)
                )
        except BaseException as exc:
            billed = exc.billed if isinstance(exc, RefgenError) else None
            if billed is not None:
                s.ledger.charge(spec.job_id, spec.key, billed.ref, billed.cost)
            s.ledger.release(spec.job_id, spec.key)
            raise
        if generated.cost_is_fallback:
            log.warning(
                "cost_fallback_used", job_id=spec.job_id, image=spec.key, cost=money(generated.cost)
            )
        # Charged before the upload: the provider has billed us whatever happens next, and the
        # charge is keyed by the paid call, so a retried upload cannot charge again.
        with tracing.span("refgen.ledger"):
            cost = s.ledger.charge(
                spec.job_id,
                spec.key,
                generated.prediction_id or f"attempt-{attempt}",
                generated.cost,
                made_note=MadeImage(generated.generation_time).note(),
            )
        crash_point("image.after_charge")
        with tracing.span("refgen.upload"):
            try:
                storage_call(lambda: s.store.put_png(spec.storage_path, generated.png))
            except StoreRefusedError:
                s.store_readiness.refused()
                raise
            crash_point("image.after_upload")
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

    def _failure(self, spec: ImageSpec, attempt: int, reason: str) -> ImageOutcome:
        log.warning("image_failed", job_id=spec.job_id, image=spec.key, reason=reason)
        return failed_outcome(self._s, spec, reason, retry_count=attempt)

    def conclude(self, spec: ImageSpec, outcome: ImageOutcome) -> Recorded:
        """Record the outcome once and announce it. Returns the outcome on record."""
        with tracing.span("refgen.record", ok=outcome.ok):
            recorded = self._s.jobs.record_outcome(
                spec.job_id,
                spec.key,
                outcome,
                announcements=[encode(outcome_event(spec, outcome)), encode(Progress(progress=0))],
            )
        crash_point("image.after_outcome_recorded")
        return recorded


def failed_outcome(
    services: Services, spec: ImageSpec, reason: str, retry_count: int = 0
) -> ImageOutcome:
    """A failed image, with whatever its paid calls cost."""
    paid = services.ledger.image_costs(spec.job_id).get(spec.key, Decimal(0))
    return ImageOutcome(
        image_type=spec.image_type,
        image_id=spec.image_id,
        ok=False,
        prompt_used=spec.prompt,
        cost=paid,
        retry_count=retry_count,
        reason=reason,
    )


def outcome_event(spec: ImageSpec, outcome: ImageOutcome) -> ImageCompleted | ImageFailed:
    if outcome.ok:
        assert outcome.image_url is not None
        return ImageCompleted(
            image_type=spec.image_type,
            image_id=spec.image_id,
            image_url=outcome.image_url,
            generation_time=outcome.generation_time,
            cost=outcome.cost,
            retry_count=outcome.retry_count,
            completed_images=0,  # filled in as the outcome is recorded
            total_images=spec.total,
        )
    return ImageFailed(
        image_type=spec.image_type,
        image_id=spec.image_id,
        retry_count=outcome.retry_count,
        reason=outcome.reason or "Unknown failure",
    )
