"""Finalization: the result is committed once, atomically with the final event, from what is
recorded; any later finalize returns it; a crash before the commit loses nothing."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from celery import Celery
from redis.client import Pipeline
from structlog.testing import capture_logs

from worker import constants as c
from worker import crashpoints
from worker.events import StageStarted, encode
from worker.generation import Bill
from worker.generation.local import LocalImageGenerator
from worker.lifecycle import Duplicate, JobFinalizer, JobIntake, Launch
from worker.models import ImageOutcome, ImageSpec
from worker.replication import Replication
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore


@pytest.fixture
def services(redis_client, tmp_path: Path) -> Services:
    return Services.build(
        Settings(generator_backend="local", storage_backend="local", job_deadline_s=30),
        client=redis_client,
        generator=LocalImageGenerator(latency_s=0),
        store=LocalImageStore(tmp_path),
    )


def image(job_id: str, kind: str, image_id: str, index: int = 1, total: int = 4) -> ImageSpec:
    return ImageSpec(
        job_id=job_id,
        image_type=kind,  # type: ignore[arg-type]
        image_id=image_id,
        prompt=f"prompt {image_id}",
        negative_prompt="n",
        seed=1,
        index=index,
        total=total,
    )


def made(kind: str, image_id: str) -> ImageOutcome:
    return ImageOutcome(
        image_type=kind,  # type: ignore[arg-type]
        image_id=image_id,
        ok=True,
        prompt_used="p",
        image_url="file:///x.png",
        generation_time=1.0,
        cost=Decimal("0.005"),
    )


def failed(kind: str, image_id: str) -> ImageOutcome:
    return ImageOutcome(
        image_type=kind,  # type: ignore[arg-type]
        image_id=image_id,
        ok=False,
        prompt_used="p",
        reason="it broke",
    )


def start_job(services: Services, images: list[tuple[str, str]]) -> tuple[str, list[ImageSpec]]:
    job_id = str(uuid.uuid4())
    specs = [image(job_id, k, i, n, len(images)) for n, (k, i) in enumerate(images, 1)]
    services.ledger.open(job_id, None)
    started = encode(StageStarted(total_images=len(specs)))
    assert services.jobs.begin(job_id, specs, deadline_s=30, started_event=started)
    return job_id, specs


def record(services: Services, job_id: str, outcome: ImageOutcome) -> None:
    key = f"{outcome.image_type}_{outcome.image_id}"
    if outcome.ok:
        services.ledger.charge(job_id, key, f"pred-{key}", outcome.cost)
    services.jobs.record_outcome(job_id, key, outcome)


def history(redis_client, job_id: str) -> list[dict]:
    entries = redis_client.xrange(c.events_stream(job_id))
    return [json.loads(fields["message"]) for _, fields in entries]


def finals(redis_client, job_id: str) -> list[dict]:
    return [
        e["data"]
        for e in history(redis_client, job_id)
        if e["event_type"] == "stage_update" and e["data"]["status"] != "started"
    ]


def test_admitting_a_job_schedules_its_deadline(services, redis_client, load_plan) -> None:
    plan = load_plan("typical_2x2")
    admission = JobIntake(services).admit(plan["job_id"], plan, None, task_id="t-1")
    assert isinstance(admission, Launch) and admission.fresh
    due = services.deadlines.due_at(plan["job_id"])
    seconds, micros = redis_client.time()
    assert due is not None and abs(due - (seconds + micros / 1e6 + 30)) < 2
    again = JobIntake(services).admit(plan["job_id"], plan, None, task_id="t-1")
    assert isinstance(again, Launch) and not again.fresh  # a redelivered start
    assert services.deadlines.due_at(plan["job_id"]) == due  # keeps the first deadline
    assert [e["event_type"] for e in history(redis_client, plan["job_id"])] == ["stage_update"]


def test_a_budget_refusal_can_be_sent_again_corrected(services, load_plan) -> None:
    plan = load_plan("typical_2x2")
    refused = JobIntake(services).admit(plan["job_id"], plan, 0.006, task_id="t-1")
    assert not isinstance(refused, Launch) and "limit is $0.02" in refused.reason
    # Issue 20, item 4: until the refusal's null is stored, a corrected start is held off,
    # or it could forget the result before the null lands, and its readers read the null.
    early = JobIntake(services).admit(plan["job_id"], plan, 180, task_id="t-2")
    assert isinstance(early, Duplicate)
    JobIntake(services).refusal_stored(plan["job_id"], "t-1")
    again = JobIntake(services).admit(plan["job_id"], plan, 180, task_id="t-2")
    assert isinstance(again, Launch)
    assert services.ledger.totals(plan["job_id"]).limit == Decimal(600)


def test_finalize_commits_once_with_one_final_event(services, redis_client) -> None:
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    for outcome in (made("scene", "a"), made("character", "c")):
        record(services, job_id, outcome)
    before = redis_client.hgetall(c.METRICS)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(JobFinalizer(services).finalize(job_id)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert results[0]["status"] == "success" and results[0]["total_cost"] == "0.01"
    assert len(finals(redis_client, job_id)) == 1
    late = JobFinalizer(services).finalize(job_id, cause="deadline")
    assert late == results[0]
    assert len(finals(redis_client, job_id)) == 1
    # Every counter moved once, by this job alone, however many finalizes raced.
    after = redis_client.hgetall(c.METRICS)
    moved = {
        name: float(after[name]) - float(before.get(name, 0))
        for name in after
        if float(after[name]) != float(before.get(name, 0))
    }
    took = moved.pop("duration:sum", 0.0)
    buckets = {name: moved.pop(name) for name in list(moved) if name.startswith("duration:le:")}
    assert moved == {
        "jobs:success": 1,
        "images:made": 2,
        "cost:nano": 10_000_000,
        "duration:count": 1,
    }
    assert took >= 0 and set(buckets.values()) == {1}
    assert redis_client.zscore(c.RETENTION_INDEX, job_id) is not None


def test_a_committed_text_only_result_is_returned_as_null_not_recomputed(services) -> None:
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    record(services, job_id, failed("scene", "a"))
    record(services, job_id, made("character", "c"))
    assert JobFinalizer(services).finalize(job_id) is None
    assert services.jobs.committed_result(job_id) == (None,)
    # A late outcome cannot change a committed job.
    assert JobFinalizer(services).finalize(job_id, [made("scene", "a")]) is None


def test_the_final_event_carries_the_committed_figures(services, redis_client) -> None:
    job_id, _ = start_job(services, [("scene", "a"), ("scene", "b"), ("character", "c")])
    record(services, job_id, made("scene", "a"))
    record(services, job_id, failed("scene", "b"))
    record(services, job_id, made("character", "c"))
    time.sleep(0.05)
    result = JobFinalizer(services).finalize(job_id)
    (final,) = finals(redis_client, job_id)
    assert result["status"] == "partial"
    assert (final["status"], final["result_status"]) == ("completed", "partial")
    assert (final["successful_images"], final["failed_images"]) == (2, 1)
    assert final["total_cost"] == result["total_cost"] == "0.01"
    assert final["total_time"] >= 0.05  # from the server's clock, started → commit


def test_deadline_marks_missing_images_failed_and_applies_the_rule(services, redis_client):
    job_id, _ = start_job(
        services, [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    )
    record(services, job_id, made("scene", "a"))
    record(services, job_id, made("character", "c"))

    result = JobFinalizer(services).finalize(job_id, cause="deadline")

    assert result is not None and result["status"] == "partial"  # 2 of 4, a scene, a character
    missing = services.jobs.stored_outcome(job_id, "scene_b")
    assert missing is not None and not missing.ok
    assert "job deadline (30 s)" in (missing.reason or "")
    events = history(redis_client, job_id)
    failed_ids = [
        e["data"]["image_id"] for e in events if e["event_type"] == "reference_generation_failed"
    ]
    assert sorted(failed_ids) == ["b", "d"]
    assert events[-1]["event_type"] == "stage_update"
    assert events[-1]["data"]["failed_images"] == 2
    progress = [e["data"]["progress"] for e in events if e["event_type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100


def test_an_image_that_ends_while_its_overdue_job_is_stopped_is_in_the_result(
    services, redis_client
) -> None:
    """A finalize reads the job in one round trip, and again once it has stopped what runs:
    an outcome recorded meanwhile is in the committed result."""
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    record(services, job_id, made("scene", "a"))
    running = services.locks.try_acquire(c.JobKeys(job_id).image_lock("character_c"))
    assert running is not None

    def finish_running() -> None:  # the delivery in flight gets its image in after all
        time.sleep(0.3)
        record(services, job_id, made("character", "c"))
        services.locks.release(running)

    thread = threading.Thread(target=finish_running)
    thread.start()
    result = JobFinalizer(services).finalize(job_id, cause="deadline")
    thread.join()

    assert result is not None and result["status"] == "success"
    assert [r["character_id"] for r in result["character_references"]] == ["c"]
    (final,) = finals(redis_client, job_id)
    assert final["successful_images"] == 2 and final["failed_images"] == 0


def test_the_outcome_that_dooms_a_job_says_so(services) -> None:
    job_id, _ = start_job(
        services, [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    )
    first = services.jobs.record_outcome(job_id, "scene_a", failed("scene", "a"))
    assert first.doomed_now is None  # the other scene can still pass
    second = services.jobs.record_outcome(job_id, "scene_b", failed("scene", "b"))
    assert second.doomed_now == "scenes"
    third = services.jobs.record_outcome(job_id, "character_c", failed("character", "c"))
    assert third.doomed_now is None  # doomed once
    assert services.jobs.doomed(job_id) == "scenes"


def test_the_outcome_that_completes_a_job_says_so_once(services) -> None:
    """Its task ends the job at once, instead of waiting for the chord's callback (issue 23)."""
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    assert not services.jobs.record_outcome(job_id, "scene_a", made("scene", "a")).last
    last = services.jobs.record_outcome(job_id, "character_c", failed("character", "c"))
    assert last.last and last.is_new
    # Issue 20, item 7: run again (its reply lost, or a redelivery), the same answer, or its
    # task no longer ends the job at once; ending it again is a read of the committed result.
    again = services.jobs.record_outcome(job_id, "character_c", made("character", "c"))
    assert again.last and not again.is_new
    assert not services.jobs.record_outcome(job_id, "scene_a", made("scene", "a")).last


def test_half_failed_dooms_a_job(services) -> None:
    images = [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    images += [("scene", "e")]
    job_id, _ = start_job(services, images)
    assert services.jobs.record_outcome(job_id, "scene_a", failed("scene", "a")).doomed_now is None
    assert services.jobs.record_outcome(job_id, "scene_b", failed("scene", "b")).doomed_now is None
    third = services.jobs.record_outcome(job_id, "character_c", failed("character", "c"))
    assert third.doomed_now == "half"  # 2 of 5 can still be made: under half


def test_a_doomed_job_skips_what_has_not_started_and_waits_for_what_runs(
    services, redis_client
) -> None:
    job_id, _specs = start_job(
        services, [("scene", "a"), ("scene", "b"), ("character", "c"), ("character", "d")]
    )
    record(services, job_id, failed("scene", "a"))
    record(services, job_id, failed("scene", "b"))
    assert services.jobs.doomed(job_id) == "scenes"
    running = services.locks.try_acquire(c.JobKeys(job_id).image_lock("character_c"))
    assert running is not None

    def finish_running() -> None:  # the delivery in flight stops (cancelled) and records
        time.sleep(0.5)
        services.ledger.charge(job_id, "character_c", "pred-c", Decimal("0.001"))
        outcome = failed("character", "c").model_copy(update={"cost": Decimal("0.001")})
        services.jobs.record_outcome(job_id, "character_c", outcome)
        services.locks.release(running)

    thread = threading.Thread(target=finish_running)
    thread.start()
    result = JobFinalizer(services).finalize(job_id, cause="doomed")
    thread.join()

    assert result is None
    skipped = services.jobs.stored_outcome(job_id, "character_d")
    assert skipped is not None and "Not made, to save money" in (skipped.reason or "")
    assert "every scene image failed" in (skipped.reason or "")
    (final,) = finals(redis_client, job_id)
    assert final["result_status"] == "text_only"
    assert final["total_cost"] == "0.001"  # the cost of what ran, the cancelled run included


def test_the_last_outcome_brings_the_deadline_forward_in_case_the_chord_never_fires(
    services, redis_client
) -> None:
    """A chord count lost in a Redis failover would leave a finished job waiting for its
    deadline; the last outcome moves the deadline to a short grace instead."""
    job_id = str(uuid.uuid4())
    specs = [image(job_id, "scene", "a", 1, 2), image(job_id, "character", "b", 2, 2)]
    started = encode(StageStarted(total_images=2))
    assert services.jobs.begin(job_id, specs, deadline_s=900, started_event=started)
    first_due = services.deadlines.due_at(job_id)
    record(services, job_id, made("scene", "a"))
    assert services.deadlines.due_at(job_id) == first_due  # one image still to come
    record(services, job_id, made("character", "b"))
    seconds, micros = redis_client.time()
    due = services.deadlines.due_at(job_id)
    assert due is not None
    assert abs(due - (seconds + micros / 1e6 + c.SETTLED_JOB_GRACE_S)) < 2
    # A finished job's deadline is gone; a last outcome recorded after that (a deadline
    # finalize that marked images failed, then a late delivery) does not bring it back.
    other = str(uuid.uuid4())
    specs = [image(other, "scene", "a", 1, 2), image(other, "character", "b", 2, 2)]
    assert services.jobs.begin(other, specs, deadline_s=900, started_event=started)
    record(services, other, made("scene", "a"))
    services.deadlines.done(other)
    record(services, other, made("character", "b"))
    assert services.deadlines.due_at(other) is None


class LostAnswerGenerator(LocalImageGenerator):
    """A generator whose scene "a" had a create whose answer was lost and that no retry
    found: its prediction turns up at the job's end (issue 20, item 1)."""

    def sweep_lost(self, job_id, requests):  # type: ignore[no-untyped-def]
        return [(r.image_key, Bill("lost-pred", Decimal("0.002"))) for r in requests][:1]


def test_a_lost_create_found_at_the_end_is_in_the_committed_cost(
    redis_client, tmp_path: Path
) -> None:
    services = Services.build(
        Settings(generator_backend="local", storage_backend="local", job_deadline_s=30),
        client=redis_client,
        generator=LostAnswerGenerator(latency_s=0),
        store=LocalImageStore(tmp_path),
    )
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c")])
    for outcome in (made("scene", "a"), made("character", "c")):
        record(services, job_id, outcome)
    result = JobFinalizer(services).finalize(job_id)
    assert result["total_cost"] == "0.012"  # both images and the lost prediction's bill
    assert finals(redis_client, job_id)[0]["total_cost"] == "0.012"


def test_a_redelivered_start_launches_the_stored_plan_with_its_seeds(services, load_plan) -> None:
    """Issue 20, item 5: admission is decided once; a redelivered start uses the plan the
    first one stored, seeds included (adoption and cancellation match predictions by them)."""
    plan = load_plan("typical_2x2")
    first = JobIntake(services).admit(plan["job_id"], plan, 180, task_id="t-1")
    again = JobIntake(services).admit(plan["job_id"], plan, 180, task_id="t-1")
    assert isinstance(first, Launch) and isinstance(again, Launch) and not again.fresh
    assert [i.seed for i in again.plan.images] == [i.seed for i in first.plan.images]
    assert again.plan.budget_limit == first.plan.budget_limit


def test_a_start_redelivered_after_its_job_ended_changes_nothing(
    services, redis_client, load_plan
) -> None:
    """Issue 20, item 5: the start died after sending its chord; the small job ended before
    the start came back. Even with a budget its spending now exceeds, the redelivery adds
    no event, reopens no ledger, and the job's result stays."""
    plan = load_plan("minimal_1x1")
    job_id = plan["job_id"]
    first = JobIntake(services).admit(job_id, plan, 0.006, task_id="t-1")
    assert isinstance(first, Launch)
    for spec in first.plan.images:
        services.ledger.charge(job_id, spec.key, f"pred-{spec.key}", Decimal("0.009"))
        record(services, job_id, made(spec.image_type, spec.image_id))
    result = JobFinalizer(services).finalize(job_id)
    assert result["status"] == "success"
    before = history(redis_client, job_id)
    spent = services.ledger.totals(job_id)

    again = JobIntake(services).admit(job_id, plan, 0.006, task_id="t-1")
    assert not isinstance(again, Launch)
    assert history(redis_client, job_id) == before
    assert services.ledger.totals(job_id) == spent
    assert services.jobs.committed_result(job_id) == (result,)


def test_an_outcome_recorded_again_gives_the_same_answer(services) -> None:
    """Issue 20, item 7: a command retried after its reply was lost (or a pipeline re-sent)
    runs record_outcome again; its answer must still say that this outcome doomed the job,
    or the early stop (and the cancel of what runs) is lost."""
    job_id, _ = start_job(services, [("scene", "a"), ("character", "c"), ("character", "d")])
    first = services.jobs.record_outcome(job_id, "scene_a", failed("scene", "a"))
    again = services.jobs.record_outcome(job_id, "scene_a", failed("scene", "a"))
    assert first.doomed_now == again.doomed_now == "scenes"
    other = services.jobs.record_outcome(job_id, "character_c", failed("character", "c"))
    assert other.doomed_now is None  # the job was doomed by another image


def test_begin_run_again_by_the_same_start_says_it_began_the_job(services) -> None:
    """Issue 20, item 7: begin_job retried after its reply was lost answered "not fresh", so
    the start did not forget a refused earlier send's null (item 4)."""
    job_id = str(uuid.uuid4())
    specs = [image(job_id, "scene", "a", 1, 1)]
    started = encode(StageStarted(total_images=1))
    begin = services.jobs.begin
    assert begin(job_id, specs, deadline_s=30, started_event=started, by="start-1") is True
    assert begin(job_id, specs, deadline_s=30, started_event=started, by="start-1") is True
    assert begin(job_id, specs, deadline_s=30, started_event=started, by="start-2") is False


def test_a_commit_sent_again_says_it_committed(services, redis_client, monkeypatch) -> None:
    """Issue 20, item 7: a commit whose pipeline was sent again (its reply lost with the
    connection) found its own result and answered "committed earlier", so no finalize logged
    the job's end. Counted once all the same: the metrics move with the first run alone."""
    job_id, _ = start_job(services, [("scene", "a")])
    record(services, job_id, made("scene", "a"))
    plain = Replication.write

    def sent_twice(self: Replication, what: str, build: Callable[[Pipeline], object]) -> list:
        if what == "result":
            plain(self, what, build)  # done; its reply lost
        return plain(self, what, build)

    monkeypatch.setattr(Replication, "write", sent_twice)
    before = int(redis_client.hget(c.METRICS, "jobs:success") or 0)
    with capture_logs() as logs:
        result = JobFinalizer(services).finalize(job_id)
        assert JobFinalizer(services).finalize(job_id) == result  # another finalize: a read
    assert [e["job_id"] for e in logs if e["event"] == "job_finished"] == [job_id]
    assert int(redis_client.hget(c.METRICS, "jobs:success")) == before + 1
    assert len(finals(redis_client, job_id)) == 1


def test_a_refusal_redelivered_before_its_null_is_stored_is_announced_once(
    services, redis_client, load_plan
) -> None:
    # A start killed after announcing its refusal and before storing the null comes back as the
    # same message: the viewers saw one end, and must not see a second.
    plan = load_plan("typical_2x2")
    for _ in range(2):
        refused = JobIntake(services).admit(plan["job_id"], plan, 0.006, task_id="t-1")
        assert not isinstance(refused, Launch) and "limit is $0.02" in refused.reason
    kinds = [e["event_type"] for e in history(redis_client, plan["job_id"])]
    assert kinds == ["error", "stage_update"]
    assert [f["result_status"] for f in finals(redis_client, plan["job_id"])] == ["refused"]
    # Once its null is stored, a start that reuses the task id is another message: announced.
    JobIntake(services).refusal_stored(plan["job_id"], "t-1")
    JobIntake(services).admit(plan["job_id"], plan, 0.006, task_id="t-1")
    assert len(finals(redis_client, plan["job_id"])) == 2


def test_the_step_that_begins_a_job_deletes_a_refused_sends_null(
    services, redis_client, load_plan, monkeypatch
) -> None:
    """Issue 20, item 4: the start forgot the refusal's null only after beginning the job, so a
    start killed in between left the null readable as this run's answer until finalize."""
    plan = load_plan("typical_2x2")
    key = f"celery-task-meta-{plan['job_id']}"
    redis_client.set(key, json.dumps({"status": "SUCCESS", "result": None}))
    # The key as the worker names it: Celery's backend's, as bytes.
    backend = Celery(backend="redis://127.0.0.1:1/0").backend
    intake = JobIntake(services, result_key=backend.get_key_for_task)
    monkeypatch.setattr(crashpoints, "_BUG_AT", "start.after_plan_stored")
    monkeypatch.setattr(crashpoints, "_FUSE", None)
    with pytest.raises(RuntimeError, match="injected fault"):  # the start dies just after
        intake.admit(plan["job_id"], plan, None, task_id="t-1")
    monkeypatch.setattr(crashpoints, "_BUG_AT", None)
    assert redis_client.get(key) is None
    again = intake.admit(plan["job_id"], plan, None, task_id="t-1")  # the redelivery
    assert isinstance(again, Launch) and not again.fresh
