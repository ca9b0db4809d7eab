"""At the provider's limit: three real workers share Replicate's budget, scaled down to 120
creates and 300 other requests a minute, through 60 four-image jobs. Every job succeeds, the
server never has to answer 429, and images are made at ≥ 90 % of the create limit.

About two and a half minutes: 240 creates at 2 a second cannot take less than two."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan

pytestmark = [pytest.mark.integration, pytest.mark.load, pytest.mark.timeout(420)]
CREATES_PER_MINUTE = 120
REQUESTS_PER_MINUTE = 300
JOBS = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[JobRunner, FakeReplicate]]:
    token = "r8_" + secrets.token_hex(16)
    plan = PredictionPlan(duration=2.0, starting_for=0.3, predict_time=1.7)
    with (
        RedisServer() as broker,
        FakeReplicate(
            api_token=token,
            default_plan=plan,
            creates_per_minute=CREATES_PER_MINUTE,
            requests_per_minute=REQUESTS_PER_MINUTE,
        ) as replicate,
    ):
        env = base_worker_env(broker.url, tmp_path / "storage")
        env.update(
            REPLICATE_API_TOKEN=token,
            REPLICATE_BASE_URL=replicate.url,
            GENERATOR_BACKEND="replicate",
            STORAGE_BACKEND="local",
            REPLICATE_CREATES_PER_MINUTE=str(CREATES_PER_MINUTE),
            REPLICATE_REQUESTS_PER_MINUTE=str(REQUESTS_PER_MINUTE),
            REFERENCE_GEN_CONCURRENCY="4",
            LOG_LEVEL="WARNING",
        )
        runner = JobRunner(broker.url)
        workers = [
            WorkerProcess(env, tmp_path / f"w{i}.log", f"w{i}").start(runner.client)
            for i in range(3)
        ]
        try:
            yield runner, replicate
        finally:
            for worker in workers:
                worker.stop()


def test_sixty_jobs_at_the_providers_limit(cluster, load_plan) -> None:
    runner, replicate = cluster
    runs: list[JobRun] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def one(plan: dict) -> None:
        try:
            run = runner(plan, duration_seconds=180, timeout_s=360)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            runs.append(run)

    threads = [threading.Thread(target=one, args=(load_plan(),)) for _ in range(JOBS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert [r.result["status"] for r in runs] == ["success"] * JOBS
    assert replicate.throttled == [], "the workers went over a limit the server enforces"
    creates = sorted(r.timestamp for r in replicate.requests_for("create"))
    assert len(creates) == 4 * JOBS  # one create per image, none repeated
    others = [r for r in replicate.api_requests if r.route != "create"]
    downloads = sorted(r.timestamp for r in replicate.requests_for("file"))
    span_s = downloads[-1] - creates[0]
    images_per_minute = len(downloads) / span_s * 60
    print(
        f"\n{len(downloads)} images in {span_s:.1f} s: {images_per_minute:.1f} a minute "
        f"({images_per_minute / CREATES_PER_MINUTE:.1%} of the create limit); "
        f"{len(others)} other API requests"
    )
    assert images_per_minute >= 0.9 * CREATES_PER_MINUTE
    assert images_per_minute <= CREATES_PER_MINUTE * 1.02  # and never above it
