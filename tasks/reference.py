"""The canvas: ``start`` → chord(``generate_reference`` × N) → ``finalize``; and ``cancel``."""

from __future__ import annotations

from typing import Any, NoReturn

import structlog
from celery import chord, group, states
from celery.exceptions import CeleryError, Ignore
from pydantic import ValidationError

from tasks.app import app, services
from tasks.backend import ImageNotMade
from tasks.publishing import publish
from tasks.recovery import (
    abandoned_as_ignored,
    finalize_and_store,
    hand_to_retry,
    retry_sent,
)
from worker import admission
from worker import constants as c
from worker.cancel import JobCanceller
from worker.crashpoints import crash_point
from worker.errors import JobStartFailed, RetryableError
from worker.fairness import image_priority
from worker.lifecycle import Cancelled, Duplicate, JobFinalizer, JobIntake, Launch
from worker.logging import Redactor
from worker.models import ImageOutcome, ImageSpec
from worker.pipeline import HeldElsewhere, ImagePipeline, RetryIn
from worker.planning import JobPlan
from worker.settings import get_settings

log = structlog.get_logger(__name__)


# ignore_result: the job's result lives under the job id (finalize's task id); start's own
# return value must never land there, even if a caller sends start with task_id=job_id.
@app.task(name=c.TASK_START, bind=True, ignore_result=True)
def start(
    self: Any,
    job_id: object = None,
    plan: object = None,
    duration_seconds: object = None,
    **unexpected: object,
) -> dict[str, Any]:
    if unexpected:
        log.warning("start_unexpected_kwargs", names=sorted(unexpected)[:10])
    try:
        return _start(self, job_id, plan, duration_seconds)
    except CeleryError:
        raise  # Ignore, Retry, Reject: Celery's own ways for a delivery to end
    except Exception as exc:
        report_failed_start(self, job_id, exc)
        raise


def report_failed_start(task: Any, job_id: object, error: Exception) -> None:
    """A ``start`` that failed on the worker (a fault, not a refusal) says so under its own
    task id, for the sender to read (``refgen run`` does): ``JobStartFailed`` with the error's
    type and message, secrets redacted, no traceback. Never under the job id, which holds the
    job's result alone."""
    task_id = task.request.id
    if not task_id or task_id == job_id:
        return
    try:
        # The settings, not services(): building those may be what failed.
        reason = Redactor(get_settings().secret_values())(f"{type(error).__name__}: {error}")
        task.backend.mark_as_failure(task_id, JobStartFailed(reason[:500]), traceback=None)
    except Exception as exc:  # the original failure is what matters; Celery logs it
        log.error("start_failure_not_stored", task_id=task_id, error=type(exc).__name__)


def _start(self: Any, job_id: object, plan: object, duration_seconds: object) -> dict[str, Any]:
    # All of it under the lease: a refusal whose null cannot be stored yet (Redis away) is
    # sent again by the watchdog, rather than leave the job id claimed and without a result.
    with abandoned_as_ignored(self):
        # A refused earlier send of this job id stored a null result: the job's begin deletes
        # it, so that readers wait for this run's.
        intake = JobIntake(services(), result_key=self.backend.get_key_for_task)
        admission = intake.admit(job_id, plan, duration_seconds, task_id=self.request.id or "")
        if isinstance(admission, Launch):
            job = admission.plan
            launch(job)
            crash_point("start.after_chord_sent")
            intake.launched(job.job_id)
            return {"job_id": job.job_id, "status": "queued", "total_images": len(job.images)}
        if isinstance(admission, Duplicate):
            return {"job_id": job_id, "status": "duplicate", "claimed_by": admission.claimed_by}
        if isinstance(admission, Cancelled):
            self.backend.store_result(admission.job_id, None, states.SUCCESS)
            return {"job_id": admission.job_id, "status": "cancelled"}
        if admission.job_id is not None:
            # The text-only answer, readable by job id like any other result; only then may
            # a corrected plan take the job id (its begin deletes this null).
            self.backend.store_result(admission.job_id, None, states.SUCCESS)
            intake.refusal_stored(admission.job_id, self.request.id or "")
        return {"job_id": admission.job_id, "status": "refused", "reason": admission.reason}


def launch(job: JobPlan) -> None:
    """Send the job's chord. Every id in it derives from the job, so a redelivered ``start``
    that sends it again makes the same chord: its parts count once, its callback runs once."""
    images = priority(image_priority(len(job.images)))
    header = group(
        [
            generate_reference.s(spec.model_dump(mode="json")).set(
                task_id=f"{job.job_id}:{spec.key}", **images, **image_shown(spec)
            )
            for spec in job.images
        ]
    ).set(task_id=f"{job.job_id}:images")
    callback = finalize.s(job.job_id).set(
        task_id=job.job_id, **priority(c.PRIORITY_TOP), **shown(f"(<outcomes>, {job.job_id!r})")
    )
    crash_point("publish.start_chord")
    # A broker blip here must not strand the job: the same chord (same ids) is sent again.
    publish("publish.start_chord", lambda: chord(header)(callback))


def shown(args: str) -> dict[str, str]:
    """How a message's arguments appear in task events (Flower) and Celery's log lines: a
    summary, not the whole spec. Celery would otherwise ``saferepr`` the arguments of every
    message it sends, on the path of a job (``bench/latency.py``), and show every image's
    prompt to whoever reads Flower."""
    return {"argsrepr": args, "kwargsrepr": "{}"}


def image_shown(spec: ImageSpec) -> dict[str, str]:
    return shown(f"(<{spec.key} of job {spec.job_id}>,)")


def priority(level: int) -> dict[str, int]:
    """A message's priority option (worker/fairness.py); none when fairness is off, so every
    message lands in its queue's one list, first in first out. A re-sent message (a retry, the
    watchdog's) keeps the priority it was delivered with."""
    return {"priority": level} if services().settings.reference_gen_fairness else {}


@app.task(
    name=c.TASK_GENERATE,
    bind=True,
    max_retries=c.GENERATION_MAX_ATTEMPTS - 1,
    # A backstop for the prefork pool only; the image deadline itself is enforced in code.
    soft_time_limit=300,
    time_limit=330,
    # A failed image is an outcome: logged in one line, without a traceback.
    throws=(ImageNotMade,),
)
def generate_reference(
    self: Any, spec: object = None, *extra: object, **unexpected: object
) -> dict[str, Any]:
    image = image_of(spec, extra, unexpected)
    with abandoned_as_ignored(self):
        refused = admission.refusal(services().jobs, image)
    if refused is not None:
        raise ImageNotMade(refused.reason or "Refused", refused.model_dump(mode="json"))
    with abandoned_as_ignored(self):
        step = ImagePipeline(services()).run(image, attempt=self.request.retries)
        if isinstance(step, HeldElsewhere):
            look_again_later(self, step.check_in_s)
        if isinstance(step, RetryIn):
            # A retry is due 2 s after its first attempt: it goes ahead of the fresh images
            # queued meanwhile, here and in the lease that may send it again.
            top = {**priority(c.PRIORITY_TOP), **image_shown(image)}
            retry = self.signature_from_request(
                self.request, retries=self.request.retries + 1, **top
            )
            token = hand_to_retry(self, dict(retry), step.delay_s)
            crash_point("image.after_retry_handover")
            crash_point("publish.image_retry")
            # Celery turns a failed retry publish into Reject(requeue=False), a FAILURE that
            # fails the chord: it is tried again instead, and if the broker stays away, this
            # delivery keeps the lease handed to the retry, for the watchdog to send it.
            sent = publish(
                "publish.image_retry",
                lambda: self.retry(
                    countdown=step.delay_s,
                    max_retries=c.GENERATION_MAX_ATTEMPTS - 1,
                    throw=False,
                    # Flower shows the task as RETRY with this as its exception: the reason.
                    exc=RetryableError(step.reason),
                    **top,
                ),
            )
            retry_sent(self.request.id, token, step.delay_s)
            crash_point("image.after_retry_sent")
            raise sent
    if step.doomed_now is not None:
        try:
            finalize_and_store(image.job_id, "doomed")
        except Exception as exc:
            # The chord's finalize still ends the job; this only ends it sooner.
            log.error("doomed_finalize_failed", job_id=image.job_id, error=type(exc).__name__)
    elif step.last:
        # The job's last outcome: end the job now, not once the chord's callback has been sent
        # and picked up (10–20 ms more, bench/latency.py); that finalize finds it committed.
        try:
            finalize_and_store(image.job_id, "last_image")
        except Exception as exc:
            log.error("last_image_finalize_failed", job_id=image.job_id, error=type(exc).__name__)
    outcome = step.outcome.model_dump(mode="json")
    if not step.outcome.ok:
        # Raised, so that the task is a FAILURE with its reason where operators look (Flower);
        # the chord still hands the outcome to finalize (tasks/backend.py).
        raise ImageNotMade(step.outcome.reason or "The image could not be made", outcome)
    return outcome


def image_of(spec: object, extra: tuple[object, ...], unexpected: dict[str, object]) -> ImageSpec:
    """The image a message asks for. One that is not an image of a plan (sent by name with
    other arguments) is refused in one line, as a forged image is (worker/admission.py), not
    failed with a traceback; it carries no outcome, for it is no image of any job."""
    try:
        if extra or unexpected:
            raise ValueError("unexpected arguments")
        return ImageSpec.model_validate(spec)
    except (ValidationError, ValueError):
        reason = "Refused: the message does not name an image of a plan; nothing was paid"
        log.error(
            "image_refused",
            reason=reason,
            extra_args=len(extra),
            unexpected_kwargs=sorted(unexpected)[:10],
        )
        raise ImageNotMade(reason, {}) from None


def look_again_later(task: Any, delay_s: float) -> NoReturn:
    """A copy of an image's task (the watchdog's re-send, a redelivery) found another delivery
    holding the image: rather than hold a worker slot while that one works (minutes), it
    sends itself again, as the same attempt, for when that delivery's lock would have expired
    were it dead, and ends without a result (the chord counts the other's). Its lease goes
    with the message, as a retry's does, so the image stays covered if both are lost."""
    again = task.signature_from_request(task.request, retries=task.request.retries)
    token = hand_to_retry(task, dict(again), delay_s)
    publish("publish.image_retry", lambda: again.apply_async(countdown=delay_s))
    retry_sent(task.request.id, token, delay_s)
    raise Ignore()


@app.task(name=c.TASK_FINALIZE, bind=True)
def finalize(self: Any, results: list[Any], job_id: str) -> Any:
    outcomes = []
    for result in results:
        try:
            outcomes.append(ImageOutcome.model_validate(result))
        except ValidationError:
            # Counted as missing (a failure), never a reason not to finish the job.
            log.error("finalize_unreadable_result", job_id=job_id, result=repr(result)[:200])
    with abandoned_as_ignored(self):
        return JobFinalizer(services()).finalize(job_id, outcomes)


@app.task(name=c.TASK_CANCEL, bind=True)
def cancel(
    self: Any, job_id: object = None, reason: object = None, **unexpected: object
) -> dict[str, Any]:
    """Cancel a job (worker/cancel.py); the answer is this task's result."""
    if unexpected:
        log.warning("cancel_unexpected_kwargs", names=sorted(unexpected)[:10])
    with abandoned_as_ignored(self):
        canceller = JobCanceller(services(), finalize=finalize_and_store)
        answer = canceller.cancel(job_id, reason, request_id=self.request.id or "")
    return answer.as_json()


@app.task(name=c.TASK_PURGE, ignore_result=True)
def purge_expired() -> dict[str, Any]:
    report = services().retention.purge()
    return {"purged_jobs": len(report.purged_jobs), "deleted_objects": report.deleted_objects}
