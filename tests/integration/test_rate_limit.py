"""Three real workers share one limit on Replicate creates: the server never sees more."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from tests.fakes._http import Fault
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.supabase_server import FakeSupabaseStorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
LIMIT = 5  # creates per second, for all workers together


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[JobRunner, FakeReplicate]]:
    token, key = "r8_" + secrets.token_hex(16), "sb-" + secrets.token_hex(16)
    with (
        RedisServer() as broker,
        FakeReplicate(api_token=token) as replicate,
        FakeSupabaseStorage(service_key=key) as supabase,
    ):
        env = base_worker_env(broker.url, tmp_path / "unused")
        env.update(
            REPLICATE_API_TOKEN=token,
            REPLICATE_BASE_URL=replicate.url,
            SUPABASE_URL=supabase.url,
            SUPABASE_SERVICE_KEY=key,
            REPLICATE_CREATES_PER_MINUTE=str(LIMIT * 60),
            REFERENCE_GEN_CONCURRENCY="4",
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


def run_jobs(runner: JobRunner, plans: list[dict]) -> list:
    results: list = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(runner(p, timeout_s=180))) for p in plans
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def busiest_second(timestamps: list[float]) -> int:
    stamps = sorted(timestamps)
    return max(sum(1 for t in stamps[i:] if t < start + 1.0) for i, start in enumerate(stamps))


def test_three_workers_never_exceed_the_shared_limit(cluster, load_plan) -> None:
    runner, replicate = cluster
    runs = run_jobs(runner, [load_plan("large_5x3") for _ in range(4)])  # 32 images, 12 slots
    assert all(run.result["status"] == "success" for run in runs)
    creates = [r.timestamp for r in replicate.requests_for(route="create")]
    assert len(creates) == 32
    assert busiest_second(creates) <= LIMIT
    assert max(creates) - min(creates) >= (32 / LIMIT) - 1.5  # it really was throttled


def test_a_429_holds_every_worker(cluster, load_plan) -> None:
    runner, replicate = cluster
    body = {"detail": "Request was throttled.", "status": 429}
    replicate.inject("create", Fault(429, body, {"Retry-After": "3"}))
    runs = run_jobs(runner, [load_plan("large_5x3") for _ in range(2)])
    assert all(run.result["status"] == "success" for run in runs)
    creates = sorted(r.timestamp for r in replicate.requests_for(route="create"))
    throttled_at = creates[0]  # the first create took the 429
    # Creates admitted before the 429 came back may still land within milliseconds; after
    # that, nobody creates until Retry-After has passed.
    during = [t for t in creates if throttled_at + 0.2 < t < throttled_at + 2.9]
    assert during == []
    assert any(t >= throttled_at + 2.9 for t in creates)
