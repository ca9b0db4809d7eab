"""Whole jobs through real worker processes with the Replicate and Supabase backends, pointed
at local servers that speak their APIs. The worker reaches them by URL alone."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from tests.fakes._http import Fault
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.supabase_server import FakeSupabaseStorage
from worker import constants as c

pytestmark = pytest.mark.integration

ROOFTOP = "Windswept rooftop"  # a text only the rooftop scene's prompt contains
DEADLINE_S = 3


@pytest.fixture(scope="module")
def secrets_in_use() -> dict[str, str]:
    # Made at run time: no credential-shaped literal lives in the repository.
    return {"token": "r8_" + secrets.token_hex(16), "key": "sb-" + secrets.token_hex(16)}


@pytest.fixture(scope="module")
def replicate_fake(secrets_in_use) -> Iterator[FakeReplicate]:
    with FakeReplicate(api_token=secrets_in_use["token"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def supabase_fake(secrets_in_use) -> Iterator[FakeSupabaseStorage]:
    with FakeSupabaseStorage(service_key=secrets_in_use["key"]) as fake:
        yield fake


@pytest.fixture(autouse=True)
def fresh_fakes(replicate_fake, supabase_fake) -> None:
    for fake in (replicate_fake, supabase_fake):
        fake.clear_faults()
        fake.clear_requests()


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    # Its own broker: the local-backend worker of other modules must not take these jobs.
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def real_env(
    module_redis, replicate_fake, supabase_fake, secrets_in_use, tmp_path_factory
) -> dict[str, str]:
    env = base_worker_env(module_redis.url, tmp_path_factory.mktemp("unused-local-store"))
    env.update(
        ENVIRONMENT="production",  # no silent fallback to a local backend
        REPLICATE_API_TOKEN=secrets_in_use["token"],
        REPLICATE_BASE_URL=replicate_fake.url,
        SUPABASE_URL=supabase_fake.url,
        SUPABASE_SERVICE_KEY=secrets_in_use["key"],
        IMAGE_TIMEOUT_S=str(DEADLINE_S),
    )
    return env


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-backend-logs")


@pytest.fixture(scope="module")
def real_worker(real_env, module_redis, log_dir) -> Iterator[WorkerProcess]:
    runner = JobRunner(module_redis.url)
    worker = WorkerProcess(real_env, log_dir / "worker.log", "real").start(runner.client)
    yield worker
    worker.stop()


@pytest.fixture
def run_real(module_redis) -> JobRunner:
    return JobRunner(module_redis.url)


def creates_for(fake: FakeReplicate, text: str, since: int = 0) -> list:
    """Predictions created for prompts containing ``text``, from the ``since``-th on."""
    return [call for call in fake.creates[since:] if text in call.input["prompt"]]


def test_job_succeeds_on_both_real_backends(
    real_worker, run_real, load_plan, replicate_fake, supabase_fake
) -> None:
    plan = load_plan("typical_2x2")
    since = len(replicate_fake.creates)
    run = run_real(plan, duration_seconds=180)

    assert run.result["status"] == "success"
    assert run.result["metadata"]["environment"] == "production"
    assert run.result["metadata"]["model_version"] == c.SDXL_VERSION
    per_image = Decimal("2.5") * Decimal("0.000725")  # predict_time × A40 price
    references = run.result["scene_references"] + run.result["character_references"]
    assert {r["cost"] for r in references} == {str(per_image)}
    assert Decimal(run.result["total_cost"]) == 4 * per_image
    for ref in references:
        assert ref["image_url"].startswith(f"{supabase_fake.url}/storage/v1/object/sign/")
        image = Image.open(io.BytesIO(httpx.get(ref["image_url"]).content))
        assert (image.format, image.size) == ("PNG", (1024, 1024))
    assert len(replicate_fake.creates[since:]) == 4
    for call in replicate_fake.creates[since:]:
        assert call.version_field == c.SDXL_VERSION
        assert call.input["num_inference_steps"] == 40
        assert call.input["apply_watermark"] is False
        assert call.input["negative_prompt"] == c.NEGATIVE_PROMPT
    stored = supabase_fake.objects(c.DEFAULT_BUCKET)
    assert sorted(o.name for o in stored if o.name.startswith(plan["job_id"])) == sorted(
        f"{plan['job_id']}/{k}.png"
        for k in (
            "scene_city_street",
            "scene_rooftop",
            "character_protagonist",
            "character_antagonist",
        )
    )
    assert all(o.content_type == "image/png" for o in stored)
    assert {s.expires_in for s in supabase_fake.signed_urls} == {1_209_600}


def test_429_with_retry_after_is_retried_after_it(
    real_worker, run_real, load_plan, replicate_fake
) -> None:
    body = {"detail": "Request was throttled. Expected available in 3 seconds.", "status": 429}
    replicate_fake.inject(
        "create", Fault(429, body, {"Retry-After": "3"}, only_if_body_contains=ROOFTOP)
    )
    run = run_real(load_plan("typical_2x2"))

    assert run.result["status"] == "success"
    retry = run.of("reference_generation_retry", image_id="rooftop")
    assert len(retry) == 1 and retry[0]["retry_in_s"] == 3.0
    assert retry[0]["reason"] == "Rate limited by Replicate"
    done = run.of("reference_generation_complete", image_id="rooftop")
    assert done[0]["retry_count"] == 1
    rooftop = [r for r in replicate_fake.requests_for(route="create") if ROOFTOP.encode() in r.body]
    assert len(rooftop) == 2
    assert rooftop[1].timestamp - rooftop[0].timestamp >= 3.0


def test_500_twice_fails_the_image_after_one_retry(
    real_worker, run_real, load_plan, replicate_fake
) -> None:
    replicate_fake.inject("create", Fault(500, only_if_body_contains=ROOFTOP), times=2)
    run = run_real(load_plan("typical_2x2"))

    assert run.result["status"] == "partial"
    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert len(failed) == 1 and failed[0]["retry_count"] == 1
    assert "HTTP 500" in failed[0]["reason"]
    assert (
        len([r for r in replicate_fake.requests_for(route="create") if ROOFTOP.encode() in r.body])
        == 2
    )


def test_prediction_past_its_deadline_is_ended_by_replicate(
    real_worker, run_real, load_plan, replicate_fake
) -> None:
    since = len(replicate_fake.creates)
    for _ in range(2):  # both attempts hang
        replicate_fake.script_next_prediction(outcome="hang", prompt_contains=ROOFTOP)
    run = run_real(load_plan("typical_2x2"))

    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert failed[0]["reason"] == f"Timed out after {DEADLINE_S} s"
    assert failed[0]["retry_count"] == 1
    hung = creates_for(replicate_fake, ROOFTOP, since)
    assert len(hung) == 2
    # Each create carried the attempt's deadline, and Replicate kept it: no explicit cancel
    # was needed, and neither prediction runs on.
    assert {call.cancel_after for call in hung} == {f"{DEADLINE_S}s"}
    assert {replicate_fake.status(call.prediction_id) for call in hung} == {"canceled"}
    assert not set(call.prediction_id for call in hung) & set(replicate_fake.cancels)


def test_nsfw_failure_is_not_retried(real_worker, run_real, load_plan, replicate_fake) -> None:
    since = len(replicate_fake.creates)
    replicate_fake.script_next_prediction(outcome="failed", prompt_contains=ROOFTOP)
    run = run_real(load_plan("typical_2x2"))

    assert not run.of("reference_generation_retry")
    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert failed[0]["retry_count"] == 0 and "NSFW" in failed[0]["reason"]
    assert len(creates_for(replicate_fake, ROOFTOP, since)) == 1


def test_upload_too_large_fails_the_image_with_a_clear_reason(
    real_worker, run_real, load_plan, supabase_fake
) -> None:
    body = {
        "statusCode": "413",
        "code": "EntityTooLarge",
        "error": "Payload too large",
        "message": "The object exceeded the maximum allowed size",
    }
    supabase_fake.inject("upload", Fault(400, body, only_if_body_contains="scene_rooftop.png"))
    run = run_real(load_plan("typical_2x2"))

    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert "too large" in failed[0]["reason"]
    assert failed[0]["retry_count"] == 0
    assert run.result["status"] == "partial"


def test_killed_pool_process_adopts_the_same_prediction(
    real_env, module_redis, log_dir, run_real, load_plan, replicate_fake, real_worker
) -> None:
    real_worker.stop()  # this test wants the only worker to be the one it kills
    env = {**real_env, "REFERENCE_GEN_POOL": "prefork", "REFERENCE_GEN_CONCURRENCY": "1"}
    worker = WorkerProcess(env, log_dir / "prefork.log", "prefork").start(run_real.client)
    try:
        plan = load_plan("minimal_1x1")
        since = len(replicate_fake.creates)
        # Slower than the time to kill, shorter than the deadline.
        replicate_fake.script_next_prediction(
            duration=2.5, predict_time=2.0, prompt_contains="pine forest"
        )
        run_real.client.send_task(
            "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
        )
        deadline = time.monotonic() + 30
        while not creates_for(replicate_fake, "pine forest", since):
            assert time.monotonic() < deadline, "the prediction was never created"
            time.sleep(0.1)
        # The server holds the create it has received (a 2.5 s run): the pool process waits in it.
        children = subprocess.run(
            ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        assert children, "no pool process found"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        killed_at = time.monotonic()  # the fake's clock: it runs in this process

        result = run_real.client.AsyncResult(plan["job_id"]).get(timeout=60)
        assert result["status"] == "success"
        forest = creates_for(replicate_fake, "pine forest", since)
        assert len(forest) == 1, "the redelivered task paid for a second prediction"
        # The create's answer died with the process: the next delivery found the prediction
        # among the account's recent ones, by its input.
        lists = replicate_fake.requests_for(route="list")
        assert lists and lists[-1].timestamp > killed_at
        assert replicate_fake.ended_after_s(forest[0].prediction_id) == 2.5  # it ran on, unkilled
        assert '"prediction_adopted"' in (log_dir / "prefork.log").read_text()
        bills = replicate_fake.bills(c.DEFAULT_HARDWARE_PRICE_PER_S)
        billed = sum(
            (bills[call.prediction_id] for call in replicate_fake.creates[since:]), Decimal(0)
        )
        assert Decimal(result["total_cost"]) == billed  # two images, each billed once
    finally:
        worker.stop()
        real_worker.start(run_real.client)


def test_credentials_appear_in_no_log_event_or_result(
    real_worker, run_real, load_plan, replicate_fake, supabase_fake, secrets_in_use, log_dir
) -> None:
    ok = run_real(load_plan("typical_2x2"))
    # A job whose every call is refused: error paths are where secrets usually leak.
    replicate_fake.api_token = "r8_" + secrets.token_hex(16)
    try:
        refused = run_real(load_plan("typical_2x2"))
    finally:
        replicate_fake.api_token = secrets_in_use["token"]
    assert ok.result["status"] == "success"
    assert refused.result is None
    reasons = [d["reason"] for d in refused.of("reference_generation_failed")]
    # Refused until the job could no longer pass; then the rest was not paid for at all.
    assert any("HTTP 401" in r for r in reasons)
    assert all("HTTP 401" in r or r.startswith("Not made, to save money") for r in reasons)

    logs = (log_dir / "worker.log").read_text()
    assert "Task reference_generator.finalize" in logs  # the log is the worker's, and full
    for secret in secrets_in_use.values():
        assert secret not in logs
        for run in (ok, refused):
            assert secret not in json.dumps(run.events)
            assert secret not in json.dumps(run.result)
