"""A job's start and end: admission (validate, claim, pre-flight) and finalization."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from worker.errors import BudgetExceededError, InvalidPlanError, RefgenError
from worker.events import (
    ImageFailed,
    JobError,
    Progress,
    StageFinished,
    StageStarted,
    encode,
)
from worker.jobs import PlannedImage
from worker.models import ImageOutcome, money
from worker.planning import JobPlan, estimate_cost, plan_job
from worker.services import Services
from worker.threshold import build_result

log = structlog.get_logger(__name__)

# How long a losing finalizer waits for the winner's result.
_FINALIZE_WAIT_S = 10.0
_MAX_JOB_ID_CHARS = 256


@dataclass(frozen=True)
class Launch:
    plan: JobPlan


@dataclass(frozen=True)
class Duplicate:
    claimed_by: str | None


@dataclass(frozen=True)
class Refused:
    job_id: str | None
    reason: str


Admission = Launch | Duplicate | Refused


def usable_job_id(job_id: object) -> str | None:
    """A job id that can name a channel and a result, even when the plan is invalid, so that
    the error reaches whoever listens. Validity (a UUID) is the plan's check, not this one."""
    if isinstance(job_id, int | float) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not 0 < len(job_id) <= _MAX_JOB_ID_CHARS:
        return None
    if not job_id.isprintable():
        return None
    return job_id


class JobIntake:
    def __init__(self, services: Services) -> None:
        self._s = services

    def admit(
        self, job_id: object, plan: object, duration_seconds: object, *, task_id: str
    ) -> Admission:
        """Decide whether a job runs. Refusals are announced here: an ``error`` event and a
        failed stage, with nothing generated or charged."""
        key = usable_job_id(job_id)
        if key is None:
            log.error("job_refused_unusable_id", job_id=repr(job_id)[:80])
            return Refused(job_id=None, reason="job_id must be a UUID string")
        s = self._s
        if not s.jobs.claim(key, task_id):
            claimed_by = s.jobs.claimed_by(key)
            meta = s.jobs.meta(key)
            # The same start message again (a redelivery after a crash) carries on where the
            # first delivery stopped; any other enqueue of the job id is a duplicate.
            if claimed_by != task_id or (meta is not None and meta.launched):
                log.info("job_duplicate_ignored", job_id=key, claimed_by=claimed_by)
                return Duplicate(claimed_by=claimed_by)
        try:
            job_plan = plan_job(
                key,
                plan,
                duration_seconds,
                max_images=s.settings.max_images_per_job,
                per_minute=s.settings.budget_per_video_minute,
            )
            s.ledger.open(key, job_plan.budget_limit)
            s.ledger.preflight(key, estimate_cost(len(job_plan.images)))
        except InvalidPlanError as exc:
            return self._refuse(key, exc, details=exc.details)
        except BudgetExceededError as exc:
            return self._refuse(
                key,
                exc,
                limit=exc.limit,
                spent=exc.spent,
                estimated_cost=exc.requested,
                image_count=len(job_plan.images),
            )
        planned = [PlannedImage(i.image_type, i.image_id, i.prompt) for i in job_plan.images]
        if s.jobs.begin(key, planned):
            s.deadlines.schedule(key, s.settings.job_deadline_s)
            s.events.publish(key, StageStarted(total_images=len(planned)))
            log.info(
                "job_started",
                job_id=key,
                images=len(planned),
                budget_limit=money(job_plan.budget_limit) if job_plan.budget_limit else None,
            )
        return Launch(plan=job_plan)

    def launched(self, job_id: str) -> None:
        self._s.jobs.mark_launched(job_id)

    def _refuse(self, job_id: str, error: RefgenError, **figures: Any) -> Refused:
        log.warning("job_refused", job_id=job_id, reason=error.reason)
        self._s.events.publish(
            job_id,
            JobError(
                reason=error.reason,
                message="Nothing was generated or charged; the pipeline continues text-only.",
                **figures,
            ),
        )
        self._s.events.publish(
            job_id,
            StageFinished(
                status="failed",
                total_images=0,
                successful_images=0,
                failed_images=0,
                total_cost=Decimal(0),
                total_time=0.0,
                result_status="invalid" if isinstance(error, InvalidPlanError) else "refused",
            ),
        )
        # A corrected plan may be sent again under the same job id.
        self._s.jobs.release_claim(job_id)
        return Refused(job_id=job_id, reason=error.reason)


class JobFinalizer:
    def __init__(self, services: Services) -> None:
        self._s = services

    def finalize(
        self, job_id: str, reported: list[ImageOutcome] | None = None, *, deadline: bool = False
    ) -> dict[str, Any] | None:
        """Apply the threshold once. A second call returns the first call's result.

        ``reported`` are the chord's results; outcomes recorded by the image tasks fill in
        the rest, and an image with neither (only at the deadline) is marked failed."""
        s = self._s
        if not s.jobs.mark_finalized(job_id):
            return self._wait_for_result(job_id)
        s.deadlines.cancel(job_id)
        meta = s.jobs.meta(job_id)
        outcomes = self._gather(job_id, reported or [], meta.images if meta else [], deadline)
        total = meta.total_images if meta else len(outcomes)
        totals = s.ledger.totals(job_id)
        result = build_result(
            job_id=job_id,
            outcomes=outcomes,
            total_images=total,
            total_cost=totals.spent,
            model_version=s.settings.model_version,
            environment=s.settings.environment,
        )
        payload = result.model_dump(mode="json") if result else None
        s.jobs.save_result(job_id, json.dumps(payload))
        s.retention.schedule(job_id, succeeded=result is not None)
        made = sum(1 for o in outcomes if o.ok)
        duration = round(time.time() - meta.started_at, 3) if meta else 0.0
        s.metrics.job_finished(
            outcome=result.status if result else "text_only",
            made=made,
            failed=total - made,
            cost=totals.spent,
            duration_s=duration,
        )
        s.events.publish(
            job_id,
            StageFinished(
                status="completed" if result else "failed",
                total_images=total,
                successful_images=made,
                failed_images=total - made,
                total_cost=totals.spent,
                total_time=duration,
                result_status=result.status if result else "text_only",
            ),
        )
        log.info(
            "job_finished",
            job_id=job_id,
            status=result.status if result else "text_only",
            made=made,
            total=total,
            cost=money(totals.spent),
            by_deadline=deadline,
        )
        return payload

    def _gather(
        self,
        job_id: str,
        reported: list[ImageOutcome],
        planned: list[PlannedImage],
        deadline: bool,
    ) -> list[ImageOutcome]:
        recorded = self._s.jobs.outcomes(job_id)
        by_key = {f"{o.image_type}_{o.image_id}": o for o in reported}
        by_key.update(recorded)  # the record wins: it is what events announced
        for image in planned:
            if image.key in by_key or not deadline:
                continue
            reason = (
                f"The image did not finish before the job deadline "
                f"({self._s.settings.job_deadline_s:g} s)"
            )
            missing = ImageOutcome(
                image_type=image.image_type,
                image_id=image.image_id,
                ok=False,
                prompt_used=image.prompt,
                reason=reason,
            )
            failed = ImageFailed(
                image_type=missing.image_type,
                image_id=missing.image_id,
                retry_count=0,
                reason=reason,
            )
            # Recorded, so a late delivery of this image stops instead of paying.
            stored, _ = self._s.jobs.record_outcome(
                job_id, image.key, missing, total=len(planned), announcements=[encode(failed)]
            )
            by_key[image.key] = stored
        if deadline:
            self._s.events.publish(job_id, Progress(progress=100))
        return list(by_key.values())

    def _wait_for_result(self, job_id: str) -> dict[str, Any] | None:
        end = time.monotonic() + _FINALIZE_WAIT_S
        while time.monotonic() < end:
            saved = self._s.jobs.saved_result(job_id)
            if saved is not None:
                loaded: dict[str, Any] | None = json.loads(saved)
                return loaded
            time.sleep(0.1)
        log.warning("finalize_result_missing", job_id=job_id)
        return None
