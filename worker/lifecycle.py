"""A job's start and end: admission (validate, claim, pre-flight) and finalization."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog

from worker.errors import BudgetExceededError, InvalidPlanError, RefgenError
from worker.events import JobError, StageFinished, StageStarted
from worker.models import ImageOutcome, money
from worker.planning import JobPlan, estimate_cost, plan_job
from worker.services import Services
from worker.threshold import build_result

log = structlog.get_logger(__name__)

# A job id names a pub/sub channel and Redis keys even when the plan is invalid, so that the
# error reaches whoever is listening. Anything else cannot be answered at all.
_USABLE_JOB_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# How long a losing finalizer waits for the winner's result.
_FINALIZE_WAIT_S = 10.0


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
    if isinstance(job_id, str) and _USABLE_JOB_ID.match(job_id):
        return job_id
    return None


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
        if not self._s.jobs.claim(key, task_id):
            claimed_by = self._s.jobs.claimed_by(key)
            log.info("job_duplicate_ignored", job_id=key, claimed_by=claimed_by)
            return Duplicate(claimed_by=claimed_by)
        settings = self._s.settings
        try:
            job_plan = plan_job(
                key,
                plan,
                duration_seconds,
                max_images=settings.max_images_per_job,
                per_minute=settings.budget_per_video_minute,
            )
            self._s.ledger.open(key, job_plan.budget_limit)
            estimate = estimate_cost(len(job_plan.images))
            self._s.ledger.preflight(key, estimate)
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
        self._s.jobs.begin(key, len(job_plan.images))
        self._s.events.publish(key, StageStarted(total_images=len(job_plan.images)))
        log.info(
            "job_started",
            job_id=key,
            images=len(job_plan.images),
            budget_limit=str(job_plan.budget_limit),
        )
        return Launch(plan=job_plan)

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

    def finalize(self, job_id: str, outcomes: list[ImageOutcome]) -> dict[str, Any] | None:
        """Apply the threshold once. A second call returns the first call's result."""
        s = self._s
        if not s.jobs.mark_finalized(job_id):
            return self._wait_for_result(job_id)
        meta = s.jobs.meta(job_id)
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
        s.events.publish(
            job_id,
            StageFinished(
                status="completed" if result else "failed",
                total_images=total,
                successful_images=made,
                failed_images=total - made,
                total_cost=totals.spent,
                total_time=round(time.time() - meta.started_at, 3) if meta else 0.0,
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
        )
        return payload

    def _wait_for_result(self, job_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + _FINALIZE_WAIT_S
        while time.monotonic() < deadline:
            saved = self._s.jobs.saved_result(job_id)
            if saved is not None:
                loaded: dict[str, Any] | None = json.loads(saved)
                return loaded
            time.sleep(0.1)
        log.warning("finalize_result_missing", job_id=job_id)
        return None
