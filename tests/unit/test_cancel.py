"""Cancelling a job (worker/cancel.py) against a real redis-server: it ends once, cancelled,
with a null result, whatever state it was in; a second cancel and a cancel after the end
change nothing and say so; a job cancelled before it starts never starts."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from tests.unit.test_finalize import failed, finals, history, made, record, services, start_job
from worker import constants as c
from worker.cancel import JobCanceller
from worker.lifecycle import Cancelled, Cause, JobFinalizer, JobIntake
from worker.pipeline import ImagePipeline
from worker.services import Services

__all__ = ["services"]  # the fixture, shared with test_finalize


def canceller(services: Services) -> JobCanceller:
    def finalize(job_id: str, cause: Cause) -> Any:
        return JobFinalizer(services).finalize(job_id, cause=cause)

    return JobCanceller(services, finalize)


def test_a_running_job_stops_paying_and_ends_cancelled_once(services, redis_client) -> None:
    job_id, specs = start_job(
        services, [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    )
    record(services, job_id, made("scene", "a"))
    answer = canceller(services).cancel(job_id, "the user\nleft", request_id="cancel-1")

    assert answer.outcome == "cancelled"
    assert (
        answer.message == f"job {job_id}: cancelled: the user left (cancelled: 1/4 images, $0.005)"
    )
    assert (answer.result_status, answer.total_cost) == ("cancelled", "0.005")
    assert services.jobs.committed_result(job_id) == (None,)
    (final,) = finals(redis_client, job_id)
    assert (final["status"], final["result_status"], final["reason"]) == (
        "cancelled",
        "cancelled",
        "the user left",
    )
    assert (final["successful_images"], final["failed_images"], final["total_cost"]) == (
        1,
        3,
        "0.005",
    )
    # The images that had not started are recorded as not made, and a late delivery of one
    # pays nothing: it finds that outcome.
    outcomes = services.jobs.outcomes(job_id)
    assert {k: o.reason for k, o in outcomes.items() if not o.ok} == {
        "scene_b": "Not made: the job was cancelled",
        "character_c": "Not made: the job was cancelled",
        "character_d": "Not made: the job was cancelled",
    }
    late = ImagePipeline(services).run(specs[1], attempt=0)
    assert not late.is_new and services.ledger.totals(job_id).spent == Decimal("0.005")
    assert history(redis_client, job_id)[-1]["data"]["status"] == "cancelled"
    metrics = redis_client.hgetall(c.METRICS)
    assert int(metrics["jobs:cancelled"]) >= 1


def test_cancelling_twice_and_after_the_end_changes_nothing(services, redis_client) -> None:
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    assert canceller(services).cancel(job_id, "first", request_id="r-1").outcome == "cancelled"
    events = history(redis_client, job_id)

    again = canceller(services).cancel(job_id, "second", request_id="r-2")
    assert again.outcome == "already_cancelled"
    assert "it was cancelled before; nothing changed" in again.message
    # The same request delivered again (its worker died) is not "another" cancel.
    redelivered = canceller(services).cancel(job_id, "first", request_id="r-1")
    assert redelivered.outcome == "cancelled"  # the same answer as its first delivery's
    assert history(redis_client, job_id) == events
    assert finals(redis_client, job_id)[0]["reason"] == "first"

    ended, _ = start_job(services, [("scene", "a"), ("character", "c")])
    for outcome in (made("scene", "a"), made("character", "c")):
        record(services, ended, outcome)
    result = JobFinalizer(services).finalize(ended)
    before = history(redis_client, ended)
    late = canceller(services).cancel(ended, "too late", request_id="r-3")
    assert late.outcome == "finished" and late.result_status == "success"
    assert "it had already ended; nothing changed (success: 2/2 images" in late.message
    assert history(redis_client, ended) == before
    assert services.jobs.committed_result(ended) == (result,)
    assert services.jobs.doomed(ended) is None  # not even marked


def test_a_job_cancelled_before_it_starts_never_starts(services, redis_client, load_plan) -> None:
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    answer = canceller(services).cancel(job_id, None, request_id="r-1")
    assert answer.outcome == "not_started"
    assert "no worker had started it" in answer.message
    assert services.jobs.committed_result(job_id) == (None,)
    (final,) = finals(redis_client, job_id)
    assert (final["status"], final["total_images"], final["total_cost"]) == ("cancelled", 0, "0")
    assert final["reason"] == "Cancelled by an operator"

    admission = JobIntake(services).admit(job_id, plan, None, task_id="start-1")
    assert admission == Cancelled(job_id)
    assert services.jobs.meta(job_id) is None  # no plan stored, no deadline, no "started"
    assert services.deadlines.due_at(job_id) is None
    assert [e["data"]["status"] for e in history(redis_client, job_id)] == ["cancelled"]


@pytest.mark.parametrize("plan_is_valid", [True, False])
def test_a_job_cancelled_while_its_start_runs_is_ended_by_that_start(
    services, redis_client, load_plan, plan_is_valid: bool
) -> None:
    """The start has claimed the job but not begun it: the cancel leaves the end to the start,
    which ends it cancelled instead of beginning it (or refusing its plan)."""
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    assert services.jobs.claim(job_id, "start-1")
    answer = canceller(services).cancel(job_id, "stop", request_id="r-1")
    assert answer.outcome == "stopping"
    assert services.jobs.committed_result(job_id) is None

    if not plan_is_valid:
        plan["scenes"] = []
    admission = JobIntake(services).admit(job_id, plan, None, task_id="start-1")
    assert admission == Cancelled(job_id)
    assert [e["data"]["status"] for e in history(redis_client, job_id)] == ["cancelled"]
    assert services.jobs.committed_result(job_id) == (None,)


def test_a_job_that_cannot_pass_is_left_to_end_as_it_would(services, redis_client) -> None:
    job_id, specs = start_job(services, [("scene", "a"), ("character", "c")])
    ImagePipeline(services).conclude(specs[0], failed("scene", "a"))
    assert services.jobs.doomed(job_id) == "scenes"
    answer = canceller(services).cancel(job_id, "stop", request_id="r-1")
    assert answer.outcome == "finished" and answer.result_status == "text_only"
    assert "could no longer pass (scenes)" in answer.message
    assert [f["result_status"] for f in finals(redis_client, job_id)] == ["text_only"]


@pytest.mark.parametrize("job_id", ["", "../etc", "x" * 65, 42, None])
def test_a_cancel_for_something_that_is_not_a_job_id_changes_nothing(
    services, redis_client, job_id: object
) -> None:
    keys = set(redis_client.keys("refgen:job:*"))
    answer = canceller(services).cancel(job_id, "x", request_id="r-1")
    assert answer.outcome == "invalid" and "is not a job id" in answer.message
    assert set(redis_client.keys("refgen:job:*")) == keys
    assert json.loads(json.dumps(answer.as_json()))["outcome"] == "invalid"
