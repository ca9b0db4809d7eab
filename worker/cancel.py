"""Cancelling a job: what ``reference_generator.cancel`` and ``refgen cancel`` do.

One Lua call (``cancel_job.lua``) marks the job cancelled, once, and says what state it was in.
The mark is the early stop's (``doomed`` = ``cancelled``): from then on no image of the job
starts a paid call, and a start that has not begun the job cannot begin it. Then the job is
ended at once, by the finalize it would get anyway (``finalize``, handed in by the task layer,
also stores the result under the job id):

- running: its queued images are recorded "Not made", its predictions in flight are cancelled
  and their outcomes (with what they ran, which is charged) waited for, within bounds; then the
  job commits ``cancelled``, result null, ``total_cost`` = what was billed;
- not started (nothing has claimed it): the cancel claims it and commits ``cancelled`` with
  nothing spent; a start that comes later finds the claim and does nothing;
- starting (a start claimed it and has not begun it): that start ends it ``cancelled`` at its
  next step (``JobIntake``);
- already ended, cancelled before, or already stopping because it cannot pass: nothing changes,
  and the answer says so.

Every answer is a sentence for a person plus the job's figures. Idempotent: a second cancel, or
the same one delivered again, changes nothing more.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

import structlog

from worker import constants as c
from worker.lifecycle import Cause
from worker.models import money
from worker.scripts import register
from worker.services import Services

log = structlog.get_logger(__name__)

_JOB_ID = re.compile(c.ID_PATTERN)
_MAX_REASON_CHARS = 200
DEFAULT_REASON = "Cancelled by an operator"

CancelOutcome = Literal[
    "cancelled",  # this request cancelled it; it has ended cancelled
    "not_started",  # this request cancelled it before it started; it never will
    "stopping",  # this request cancelled it while it was starting; its start ends it
    "already_cancelled",  # an earlier request had; nothing changed
    "finished",  # it had ended; nothing changed
    "invalid",  # not a job id
]
# What a cancel answers when the job ends cancelled (or will): everything else changed nothing.
TAKEN: tuple[CancelOutcome, ...] = ("cancelled", "not_started", "stopping", "already_cancelled")


@dataclass(frozen=True)
class CancelAnswer:
    job_id: str | None
    outcome: CancelOutcome
    message: str
    result_status: str | None = None
    total_images: int | None = None
    successful_images: int | None = None
    total_cost: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def clean_reason(reason: object) -> str:
    """The reason as one printable line of at most 200 characters (it goes into an event)."""
    if not isinstance(reason, str):
        return DEFAULT_REASON
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in reason).split())
    return text[:_MAX_REASON_CHARS] or DEFAULT_REASON


class JobCanceller:
    def __init__(self, services: Services, finalize: Callable[[str, Cause], Any]) -> None:
        self._s = services
        self._finalize = finalize
        self._mark = register(services.client, "cancel_job")

    def cancel(self, job_id: object, reason: object, *, request_id: str) -> CancelAnswer:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            shown = repr(job_id)[:80]
            return CancelAnswer(
                None,
                "invalid",
                f"{shown} is not a job id: ids are letters, digits, '-' and "
                "'_', at most 64 of them; nothing was cancelled",
            )
        why = clean_reason(reason)
        state, detail = self._mark_cancelled(job_id, why, request_id)
        log.info("job_cancel_requested", job_id=job_id, state=state, reason=why)
        if state == "finished":
            return self._answer(job_id, "finished", "it had already ended; nothing changed")
        if state == "again":
            # The first request ends the job (its lease brings it back if its worker dies).
            return self._answer(
                job_id, "already_cancelled", "it was cancelled before; nothing changed"
            )
        if state == "stopping":
            self._finalize(job_id, "doomed")
            return self._answer(
                job_id,
                "finished",
                f"it could no longer pass ({detail}) and had already stopped paying; it ends "
                "text-only; the cancel changed nothing",
            )
        if state == "starting":
            return CancelAnswer(
                job_id,
                "stopping",
                f"job {job_id} was starting: it will not begin, and ends cancelled ({why})",
            )
        self._finalize(job_id, "cancelled")
        if state == "before_start":
            return self._answer(
                job_id,
                "not_started",
                "no worker had started it (it is queued, or was never sent): it will not start",
            )
        return self._answer(job_id, "cancelled", f"cancelled: {why}")

    def _mark_cancelled(self, job_id: str, reason: str, request_id: str) -> tuple[str, str]:
        keys = c.JobKeys(job_id)
        # Lost in a failover, the mark would let queued images of the job pay.
        ((state, detail),) = self._s.replication.write(
            "job_cancelled",
            lambda pipe: self._mark(
                keys=[keys.meta, keys.claim, keys.result],
                args=[
                    reason,
                    request_id,
                    self._s.settings.job_state_ttl_s,
                    f"{c.CANCEL_CLAIM_PREFIX}{request_id}",
                ],
                client=pipe,
            ),
        )
        return str(state), str(detail)

    def _answer(self, job_id: str, outcome: CancelOutcome, what: str) -> CancelAnswer:
        """The answer with the job's figures, from what is committed (or recorded so far)."""
        s = self._s
        committed = s.jobs.committed_result(job_id)
        meta = s.jobs.meta(job_id)
        outcomes = s.jobs.outcomes(job_id)
        total = meta.total_images if meta is not None else len(outcomes)
        made = sum(1 for o in outcomes.values() if o.ok)
        spent: Decimal = s.ledger.totals(job_id).spent
        status = None
        if committed is not None:
            result = committed[0]
            if isinstance(result, dict):
                status = str(result.get("status"))
            else:
                status = "cancelled" if s.jobs.doomed(job_id) == "cancelled" else "text_only"
        if outcome in ("cancelled", "already_cancelled") and status not in (None, "cancelled"):
            # The job's own end was committed first: the cancel came too late to change it.
            outcome, what = "finished", "it ended before the cancel took effect; nothing changed"
        ended = f" ({status}: {made}/{total} images, ${money(spent)})" if status else ""
        return CancelAnswer(
            job_id,
            outcome,
            f"job {job_id}: {what}{ended}",
            result_status=status,
            total_images=total,
            successful_images=made,
            total_cost=money(spent),
        )
