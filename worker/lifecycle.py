"""A job's start and end: admission (validate, claim, pre-flight) and finalization (the rule,
or a cancellation's null: worker/cancel.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import structlog

from worker import constants as c
from worker.budget import to_nano
from worker.crashpoints import crash_point
from worker.errors import BudgetExceededError, InvalidPlanError, RefgenError
from worker.events import JobError, StageCancelled, StageFinished, StageStarted, encode
from worker.jobs import Commit
from worker.metrics import DURATION_BUCKETS_S
from worker.models import ImageOutcome, ImageSpec, money
from worker.pipeline import (
    cancelled_reason,
    generation_request,
    skipped_reason,
)
from worker.planning import JobPlan, estimate_cost, plan_job
from worker.services import Services
from worker.stopping import stop_spending
from worker.threshold import build_result

log = structlog.get_logger(__name__)

_MAX_JOB_ID_CHARS = 256
Cause = Literal["chord", "last_image", "deadline", "doomed", "cancelled"]


@dataclass(frozen=True)
class Launch:
    plan: JobPlan
    fresh: bool  # False when a redelivered start had already begun the job


@dataclass(frozen=True)
class Duplicate:
    claimed_by: str | None


@dataclass(frozen=True)
class Refused:
    job_id: str | None
    reason: str


@dataclass(frozen=True)
class Cancelled:
    """Cancelled before it began: it never starts, and it has ended (null result)."""

    job_id: str


Admission = Launch | Duplicate | Refused | Cancelled


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
    def __init__(
        self, services: Services, result_key: Callable[[str], str | bytes] | None = None
    ) -> None:
        """``result_key`` names the result backend's key for a job id: a job that begins
        deletes a refused earlier send's null there, in the step that begins it."""
        self._s = services
        self._result_key = result_key

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
            if claimed_by is not None and claimed_by.startswith(c.CANCEL_CLAIM_PREFIX):
                return self._cancelled(key)
            meta = s.jobs.meta(key)
            # The same start message again (a redelivery after a crash) carries on where the
            # first delivery stopped; any other enqueue of the job id is a duplicate.
            if claimed_by != task_id or (meta is not None and meta.launched):
                log.info("job_duplicate_ignored", job_id=key, claimed_by=claimed_by)
                return Duplicate(claimed_by=claimed_by)
            if meta is not None:
                # Admission is decided once: the plan stored by the first delivery, with its
                # seeds (which adoption and cancellation match predictions by), is the plan;
                # a job that has ended meanwhile is left as it ended.
                if s.jobs.committed_result(key) is not None:
                    log.info("job_already_ended", job_id=key)
                    return Duplicate(claimed_by=claimed_by)
                stored = JobPlan(key, meta.images, s.ledger.totals(key).limit)
                return Launch(plan=stored, fresh=False)
        crash_point("start.after_claim")
        try:
            job_plan = plan_job(
                key,
                plan,
                duration_seconds,
                max_images=s.settings.max_images_per_job,
                per_minute=s.settings.budget_per_video_minute,
            )
            opened = s.ledger.open(key, job_plan.budget_limit)
            crash_point("start.after_ledger_open")
            s.ledger.preflight(key, estimate_cost(len(job_plan.images)), opened)
        except InvalidPlanError as exc:
            return self._refuse(key, task_id, exc, details=exc.details)
        except BudgetExceededError as exc:
            return self._refuse(
                key,
                task_id,
                exc,
                limit=exc.limit,
                spent=exc.spent,
                estimated_cost=exc.requested,
                image_count=len(job_plan.images),
            )
        fresh = s.jobs.begin(
            key,
            job_plan.images,
            deadline_s=s.settings.job_deadline_s,
            started_event=encode(StageStarted(total_images=len(job_plan.images))),
            by=task_id,
            stale_result_key=self._result_key(key) if self._result_key else None,
        )
        if fresh is None:
            return self._cancelled(key)
        crash_point("start.after_plan_stored")
        if fresh:
            log.info(
                "job_started",
                job_id=key,
                images=len(job_plan.images),
                budget_limit=money(job_plan.budget_limit) if job_plan.budget_limit else None,
            )
        return Launch(plan=job_plan, fresh=fresh)

    def launched(self, job_id: str) -> None:
        self._s.jobs.mark_launched(job_id)

    def _cancelled(self, job_id: str) -> Cancelled:
        """End a job cancelled before it began (idempotent: the cancel may have ended it)."""
        log.info("job_cancelled_before_start", job_id=job_id)
        JobFinalizer(self._s).finalize(job_id, cause="cancelled")
        return Cancelled(job_id)

    def _refuse(
        self, job_id: str, task_id: str, error: RefgenError, **figures: Any
    ) -> Refused | Cancelled:
        if self._s.jobs.doomed(job_id) == "cancelled":
            return self._cancelled(job_id)  # one end: the cancel's, not a refusal after it
        log.warning("job_refused", job_id=job_id, reason=error.reason)
        # Named by the start's task id: the same message redelivered (its worker died before
        # storing the null) refuses again and announces nothing twice; the marks go once the
        # null is stored (``refusal_stored``).
        once = _refusal_once(task_id)
        self._s.events.publish(
            job_id,
            JobError(
                reason=error.reason,
                message="Nothing was generated or charged; the pipeline continues text-only.",
                **figures,
            ),
            once=once[0] if once else None,
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
            once=once[1] if once else None,
        )
        # The claim is kept until the refusal's null result is stored (``refusal_stored``):
        # a corrected start let in sooner could forget the result before the null landed,
        # and its readers would take the null for its answer.
        return Refused(job_id=job_id, reason=error.reason)

    def refusal_stored(self, job_id: str, task_id: str) -> None:
        """The refused job's null result is stored: a corrected plan may now be sent again
        under the same job id, and announced, even by a start that reuses the task id."""
        marks = [c.JobKeys(job_id).sent(once) for once in _refusal_once(task_id) or ()]
        self._s.jobs.release_claim(job_id, *marks)


def _refusal_once(task_id: str) -> tuple[str, str] | None:
    """The names of a refusal's two announcements (its error, its end), for its start."""
    return (f"refusal:{task_id}:error", f"refusal:{task_id}:end") if task_id else None


class JobFinalizer:
    def __init__(self, services: Services) -> None:
        self._s = services

    def finalize(
        self, job_id: str, reported: Sequence[ImageOutcome] = (), *, cause: Cause = "chord"
    ) -> Any:
        """The job's result: the one committed, or, if none is yet, the one computed from what
        is recorded and committed now, atomically with the final event. Safe to call any
        number of times, from any worker, at any point of a crash: only a commit changes
        anything, and only the first commit counts.

        ``reported`` are the chord's results (the record wins where both exist). At the
        deadline, images with no outcome are marked failed; for a job that can no longer
        pass, its images still in flight are cancelled first."""
        s = self._s
        job = s.jobs.closing(job_id)
        if job.committed is not None:
            return job.committed[0]
        meta = job.meta
        planned = meta.images if meta is not None else []
        if cause == "deadline":
            # Nothing paid after the job ends: what runs is cancelled and its bill charged
            # before the commit.
            reason = (
                "The image did not finish before the job deadline "
                f"({s.settings.job_deadline_s:g} s)"
            )
            stop_spending(s, job_id, planned, skipped=reason, stopped=reason)
            job = s.jobs.closing(job_id)  # with the outcomes stopping recorded
        elif cause in ("doomed", "cancelled") and meta is not None and meta.doomed is not None:
            stop_spending(
                s,
                job_id,
                planned,
                skipped=skipped_reason(meta.doomed),
                stopped=cancelled_reason(meta.doomed),
            )
            job = s.jobs.closing(job_id)
        self._charge_lost(job_id, planned)
        outcomes = {f"{o.image_type}_{o.image_id}": o for o in reported}
        outcomes.update(job.outcomes)  # the record wins: it is what events announced
        total = meta.total_images if meta is not None else len(outcomes)
        # A cancelled job ends cancelled whichever finalize commits it; one cancelled before it
        # began has no plan, only its cancellation. Read again, last: a search for lost
        # predictions (above) can take seconds, and a cancel may land meanwhile.
        cancelled = s.jobs.doomed(job_id) == "cancelled"
        crash_point("finalize.before_commit")
        commit = self._commit(job_id, list(outcomes.values()), total, cancelled=cancelled)
        is_new, result = s.jobs.commit(job_id, commit, DURATION_BUCKETS_S)
        crash_point("finalize.after_commit")
        if is_new:
            log.info(
                "job_finished",
                job_id=job_id,
                status=commit.outcome,
                made=sum(1 for o in outcomes.values() if o.ok),
                total=total,
                by=cause,
            )
        return result

    def _commit(
        self, job_id: str, outcomes: list[ImageOutcome], total: int, *, cancelled: bool
    ) -> Commit:
        s = self._s
        spent = s.ledger.totals(job_id).spent
        result = None
        if not cancelled:
            result = build_result(
                job_id=job_id,
                outcomes=outcomes,
                total_images=total,
                total_cost=spent,
                model_version=s.settings.model_version,
                environment=s.settings.environment,
            )
        made = sum(1 for o in outcomes if o.ok)
        figures = {
            "total_images": total,
            "successful_images": made,
            "failed_images": total - made,
            "total_cost": spent,
            "total_time": 0.0,  # from the server's clock, as the result is committed
        }
        final: StageFinished
        if cancelled:
            status = "cancelled"
            final = StageCancelled(reason=s.jobs.cancel_reason(job_id) or "Cancelled", **figures)
        else:
            status = result.status if result is not None else "text_only"
            final = StageFinished(
                status="completed" if result is not None else "failed",
                result_status=status,
                **figures,
            )
        return Commit(
            result_json=json.dumps(result.model_dump(mode="json") if result else None),
            final_event=encode(final),
            keep_s=s.retention.keep_s(succeeded=result is not None),
            outcome=status,
            made=made,
            failed=total - made,
            cost_nano=to_nano(spent),
        )

    def _charge_lost(self, job_id: str, planned: list[ImageSpec]) -> None:
        """A create whose answer was lost and whose prediction no retry found (it reached
        Replicate after the retry searched) was still billed: stop it and charge it, keyed by
        its id as every charge is, so that the committed cost is what Replicate billed."""
        s = self._s
        requests = [generation_request(spec, 0, s.settings.image_timeout_s) for spec in planned]
        for image_key, bill in s.generator.sweep_lost(job_id, requests):
            s.ledger.charge(job_id, image_key, bill.ref, bill.cost)
