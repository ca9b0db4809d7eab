"""Cancelling a job for real: ``refgen cancel`` sends ``reference_generator.cancel`` by name,
real workers on the Replicate path answer it, and ``refgen run`` watches the job end.

A cancel is a task: it waits for a free slot like any other, at the top priority. To cancel a
job whose worker is busy with its predictions, the tests queue the cancel first and then start
a second worker, which takes the cancel before the job's queued images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks import exit_codes
from tests.fakes.replicate_server import PredictionPlan
from tests.integration.test_cli import ROOT, refgen, write
from tests.integration.test_replicate_path import (
    broker,
    fake,
    job_bills,
    runner,
    start_worker,
    token,
    wait_for,
)
from worker import constants as c
from worker.budget import from_nano

__all__ = ["broker", "fake", "runner", "start_worker", "token"]  # fixtures used here

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def env(broker) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": broker.url}


@pytest.fixture
def store(broker) -> redis.Redis:
    return redis.Redis.from_url(broker.url, decode_responses=True)


def events(store: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f["message"]) for _, f in store.xrange(c.events_stream(job_id))]


def finals(store: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in events(store, job_id)
        if e["event_type"] == c.EVENT_STAGE_UPDATE and e["data"]["status"] != "started"
    ]


def queued_tasks(store: redis.Redis, queue: str = c.DEFAULT_QUEUE) -> list[str]:
    """The names of the tasks waiting on a queue's top-priority list."""
    return [json.loads(raw)["headers"]["task"] for raw in store.lrange(queue, 0, -1)]


def test_cancel_stops_what_runs_skips_what_waits_and_ends_the_job_once(
    fake, start_worker, env, store, load_plan, tmp_path: Path
) -> None:
    """Two slots hold the job's first two predictions (60 s each); its other two images wait.
    The cancel is queued, a second worker takes it: the predictions are cancelled and charged
    for what they ran, the waiting images are never created, the job ends cancelled once with
    a null result, and `refgen run` says so. A second cancel answers that nothing changed."""
    fake.default_plan = PredictionPlan(duration=60.0, starting_for=0.2, predict_time=60.0)
    start_worker(fake, "busy", REFERENCE_GEN_CONCURRENCY="2", IMAGE_TIMEOUT_S="90")
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    run = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", str(write(tmp_path, plan))],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                len(fake.creates) == 2
                and all(fake.status(call.prediction_id) == "processing" for call in fake.creates)
            ),
            30,
            "two predictions running",
        )
        cancel = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "cancel", job_id, "--reason", "the user left"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: c.TASK_CANCEL in queued_tasks(store), 30, "the cancel queued")
        start_worker(fake, "free")
        out, err = cancel.communicate(timeout=60)
        assert cancel.returncode == exit_codes.RESULT, err
        answer = json.loads(out)
        assert answer["outcome"] == "cancelled" and answer["result_status"] == "cancelled"
        assert err.startswith(f"refgen: job {job_id}: cancelled: the user left (cancelled: 0/4")

        run_out, run_err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == exit_codes.CANCELLED, run_err
    assert json.loads(run_out) is None
    last = run_err.strip().splitlines()[-1]
    assert last.startswith("cancelled: 0 of 4 images made before the cancel, $")
    assert last.endswith("(the user left); the result is null")

    running = [call.prediction_id for call in fake.creates]
    assert len(running) == 2  # the two waiting images were never created
    assert set(fake.cancels) == set(running)
    assert {fake.status(p) for p in running} == {"canceled"}
    (final,) = finals(store, job_id)
    assert (final["status"], final["result_status"], final["reason"]) == (
        "cancelled",
        "cancelled",
        "the user left",
    )
    spent = from_nano(int(store.hget(c.JobKeys(job_id).ledger, "spent") or 0))
    assert Decimal(final["total_cost"]) == spent == job_bills(fake) > 0
    assert answer["total_cost"] == final["total_cost"]
    reasons = {
        e["data"]["image_id"]: e["data"]["reason"]
        for e in events(store, job_id)
        if e["event_type"] == c.EVENT_IMAGE_FAILED
    }
    assert reasons == {
        "city_street": "Stopped while it was being made: the job was cancelled",
        "rooftop": "Stopped while it was being made: the job was cancelled",
        "protagonist": "Not made: the job was cancelled",
        "antagonist": "Not made: the job was cancelled",
    }
    assert events(store, job_id)[-1]["data"]["status"] == "cancelled"

    history = events(store, job_id)
    again = refgen("cancel", job_id, env=env)
    assert again.returncode == exit_codes.RESULT, again.stderr
    assert json.loads(again.stdout)["outcome"] == "already_cancelled"
    assert "it was cancelled before; nothing changed" in again.stderr
    assert events(store, job_id) == history


def test_cancel_after_the_end_changes_nothing_and_says_so(
    fake, start_worker, runner, env, store, load_plan
) -> None:
    start_worker(fake)
    fake.default_plan = PredictionPlan(duration=0.5, predict_time=0.4)
    done = runner(load_plan("typical_2x2"))
    assert done.result["status"] == "success"
    history = events(store, done.job_id)

    late = refgen("cancel", done.job_id, "--reason", "too late", env=env)
    assert late.returncode == exit_codes.ALREADY_ENDED, late.stderr
    answer = json.loads(late.stdout)
    assert (answer["outcome"], answer["result_status"]) == ("finished", "success")
    assert "it had already ended; nothing changed (success: 4/4 images" in late.stderr
    assert events(store, done.job_id) == history
    assert runner.client.AsyncResult(done.job_id).get(timeout=10) == done.result


def test_a_job_cancelled_before_it_starts_never_starts(
    fake, start_worker, runner, env, store, load_plan
) -> None:
    worker = start_worker(fake)
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    before = refgen("cancel", job_id, env=env)
    assert before.returncode == exit_codes.RESULT, before.stderr
    assert json.loads(before.stdout)["outcome"] == "not_started"
    assert "no worker had started it" in before.stderr

    runner.client.send_task(
        c.TASK_START, kwargs={"job_id": job_id, "plan": plan}, ignore_result=True
    )

    def start_refused() -> bool:
        return any(
            '"event": "job_cancelled_before_start"' in line and job_id in line
            for line in worker.log_path.read_text().splitlines()
        )

    wait_for(start_refused, 30, "the start to find the job cancelled")
    assert fake.creates == []
    assert [e["data"]["status"] for e in events(store, job_id)] == ["cancelled"]
    assert runner.client.AsyncResult(job_id).get(timeout=10) is None


def test_cancel_refuses_what_is_not_a_job_id(env) -> None:
    done = refgen("cancel", "../etc/passwd", env=env)
    assert done.returncode == exit_codes.INVALID
    assert "is not a job id" in done.stderr and "Traceback" not in done.stderr
    # No worker runs in this test: the cancel waits in the queue, and the command says so.
    nobody = refgen("cancel", str(uuid.uuid4()), "--timeout", "2", env=env)
    assert nobody.returncode == exit_codes.TIMEOUT, nobody.stderr
    assert "no worker answered the cancel" in nobody.stderr
