"""The store, when it misbehaves for real: down when a worker starts, its bucket deleted while
workers run, its key refused, frozen mid-upload. Images are generated on a Replicate-like
server, so "no money spent on an image that cannot be kept" is counted in predictions."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.fakes._http import Fault
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan
from tests.fakes.supabase_server import FakeSupabaseStorage
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
ROOFTOP = "Windswept rooftop"
ROOFTOP_PNG = "scene_rooftop.png"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    token, key = "r8_" + secrets.token_hex(16), "sb-" + secrets.token_hex(16)
    with RedisServer() as broker, FakeReplicate(api_token=token) as replicate:
        replicate.default_plan = PredictionPlan(duration=0.3)
        storage = FakeSupabaseStorage(service_key=key, port=free_port())  # not started yet
        env = base_worker_env(broker.url, tmp_path / "unused")
        env.update(
            ENVIRONMENT="production",
            REPLICATE_API_TOKEN=token,
            REPLICATE_BASE_URL=replicate.url,
            SUPABASE_URL=f"http://127.0.0.1:{storage._port}",
            SUPABASE_SERVICE_KEY=key,
            LEASE_TTL_S="2",
        )
        workers: list[WorkerProcess] = []
        yield {
            "env": env,
            "runner": JobRunner(broker.url),
            "replicate": replicate,
            "storage": storage,
            "workers": workers,
            "tmp": tmp_path,
        }
        for worker in workers:
            worker.stop()
        storage.stop()


def start_worker(world: dict, **env: str) -> WorkerProcess:
    tmp: Path = world["tmp"]
    worker = WorkerProcess({**world["env"], **env}, tmp / f"w{len(world['workers'])}.log", "w")
    world["workers"].append(worker.start(world["runner"].client))
    return worker


def test_a_worker_started_while_storage_is_down_recovers_without_a_restart(
    world, load_plan
) -> None:
    worker = start_worker(world)
    assert "bucket_check_failed" in worker.log_path.read_text()
    down = world["runner"](load_plan("typical_2x2"), timeout_s=60)
    # Storage unreachable: every image fails before its paid call, nothing is spent.
    assert down.result is None
    assert world["replicate"].creates == []
    reasons = {d["reason"] for d in down.of("reference_generation_failed")}
    assert "Could not reach Supabase Storage" in reasons
    assert all(r.startswith(("Could not reach", "Not made, to save money")) for r in reasons)

    world["storage"].start()  # storage is back; the bucket does not exist yet
    assert c.DEFAULT_BUCKET not in world["storage"].buckets
    back = world["runner"](load_plan("typical_2x2"), timeout_s=60)
    assert back.result["status"] == "success"
    assert c.DEFAULT_BUCKET in world["storage"].buckets  # created by the running worker
    assert len(world["replicate"].creates) == 4
    assert worker.alive


def test_a_bucket_deleted_while_workers_run_is_created_again(world, load_plan) -> None:
    world["storage"].start()
    start_worker(world)
    first = world["runner"](load_plan("typical_2x2"), timeout_s=60)
    assert first.result["status"] == "success"
    world["storage"].delete_bucket(c.DEFAULT_BUCKET)
    second = world["runner"](load_plan("typical_2x2"), timeout_s=60)
    assert second.result["status"] == "success"
    assert c.DEFAULT_BUCKET in world["storage"].buckets
    assert len(world["replicate"].creates) == 8  # no image paid for twice


def test_a_store_that_refuses_the_key_stops_the_spending(world, load_plan) -> None:
    world["storage"].start()
    start_worker(world, SUPABASE_SERVICE_KEY="sb-" + secrets.token_hex(16))
    run = world["runner"](load_plan("typical_2x2"), timeout_s=60)
    assert run.result is None
    reasons = {d["reason"] for d in run.of("reference_generation_failed")}
    assert "Supabase refused the service key" in reasons
    # Refused until the job could no longer pass; the rest were not even tried.
    assert all(r.startswith(("Supabase refused", "Not made, to save money")) for r in reasons)
    assert world["replicate"].creates == []  # checked before the paid call, every time


def test_a_frozen_storage_server_fails_the_image_within_its_deadline(world, load_plan) -> None:
    world["storage"].start()
    world["storage"].create_bucket(c.DEFAULT_BUCKET)
    start_worker(world, IMAGE_TIMEOUT_S="3")
    for _ in range(6):  # every upload of the rooftop hangs for a minute
        world["storage"].inject("upload", Fault(delay=60, only_if_body_contains=ROOFTOP_PNG))
    run = world["runner"](load_plan("typical_2x2"), timeout_s=60)

    assert run.result["status"] == "partial"
    failed = run.of("reference_generation_failed", image_id="rooftop")
    assert failed and failed[0]["reason"] == "Supabase Storage did not answer in time"
    retry = run.of("reference_generation_retry", image_id="rooftop")
    assert len(retry) == 1 and retry[0]["retry_in_s"] == 2  # two attempts, 2 s apart
    # Each attempt sent one upload and stopped when its 3 s deadline cut it: the storage
    # retries (three tries an attempt, each with a 30 s timeout) never ran past it.
    uploads = [r for r in world["storage"].requests_for("upload") if ROOFTOP_PNG in r.path]
    assert len(uploads) == 2, [r.path for r in uploads]
    assert world["storage"].pending_faults("upload") == 6 - 2
    worker_log = world["workers"][0].log_path.read_text()
    assert '"storage_retry"' not in worker_log
    rooftop = [call for call in world["replicate"].creates if ROOFTOP in call.input["prompt"]]
    assert len(rooftop) == 1  # the retry resumed the paid prediction instead of a new one
