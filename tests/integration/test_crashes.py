"""Bad days, for real: killed workers, a restarted broker, tasks delivered twice.

Each test has its own redis-server (with AOF, so queues survive a restart) and its own workers.
The local generator journals every image it makes, so "never generated again" is counted, not
assumed. In each test the job ends with the right result, and its recorded cost equals the sum
of its images' costs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from worker.leases import LEASE_PAYLOADS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "generated.log"


@pytest.fixture
def env(broker: RedisServer, journal: Path, tmp_path: Path) -> dict[str, str]:
    environment = base_worker_env(broker.url, tmp_path / "storage")
    environment.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_LATENCY_S="2",
        LOCAL_GENERATOR_JOURNAL=str(journal),
        LEASE_TTL_S="4",
        JOB_DEADLINE_S="150",
    )
    return environment


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def start_worker(
    env: dict[str, str],
    runner: JobRunner,
    tmp_path: Path,
    name: str,
    workers: list[WorkerProcess],
    **overrides: str,
) -> WorkerProcess:
    worker = WorkerProcess({**env, **overrides}, tmp_path / f"{name}.log", name)
    workers.append(worker.start(runner.client))
    return worker


def generated(journal: Path, job_id: str) -> Counter[str]:
    if not journal.exists():
        return Counter()
    lines = [line.split() for line in journal.read_text().splitlines()]
    return Counter(key for job, key, *_ in lines if job == job_id)


def in_background(runner: JobRunner, plan: dict[str, Any]) -> tuple[threading.Thread, list]:
    box: list[JobRun] = []
    thread = threading.Thread(target=lambda: box.append(runner(plan, timeout_s=240)))
    thread.start()
    return thread, box


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def assert_costs_add_up(run: JobRun, broker: RedisServer, images: int) -> None:
    references = run.result["scene_references"] + run.result["character_references"]
    total = sum((Decimal(r["cost"]) for r in references), Decimal(0))
    assert Decimal(run.result["total_cost"]) == total
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    charges = client.hgetall(f"refgen:job:{{{run.job_id}}}:charges")
    assert len(charges) == images  # one charge per image, however often its task ran
    ledger = client.hgetall(f"refgen:job:{{{run.job_id}}}:ledger")
    assert Decimal(int(ledger["spent"])) / 10**9 == total


def test_whole_worker_sigkill_mid_job_then_a_new_worker_finishes_it(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    runner = JobRunner(broker.url)
    first = start_worker(env, runner, tmp_path, "doomed", workers)
    plan = load_plan("large_5x3")  # 8 images on 4 slots: two rounds
    thread, box = in_background(runner, plan)
    wait_for(lambda: sum(generated(journal, plan["job_id"]).values()) >= 4, 60, "round one")
    done_before = set(generated(journal, plan["job_id"]))
    time.sleep(0.5)  # round two is generating
    os.killpg(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    start_worker(env, runner, tmp_path, "rescuer", workers)
    thread.join(timeout=240)
    recovery_s = time.monotonic() - killed_at
    print(f"\nwhole-worker SIGKILL: job finished {recovery_s:.1f} s after the kill")

    run = box[0]
    assert run.result["status"] == "success"
    assert recovery_s < 180  # the bound; see bench/ and README for the figure
    counts = generated(journal, plan["job_id"])
    assert len(counts) == 8
    assert all(counts[key] == 1 for key in done_before)  # stored: never generated again
    assert all(n <= 2 for n in counts.values())  # interrupted: at most once more
    assert_costs_add_up(run, broker, images=8)


def test_pool_process_sigkill_mid_generation(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    runner = JobRunner(broker.url)
    worker = start_worker(
        env,
        runner,
        tmp_path,
        "prefork",
        workers,
        REFERENCE_GEN_POOL="prefork",
        REFERENCE_GEN_CONCURRENCY="2",
    )
    plan = load_plan("minimal_1x1")
    thread, box = in_background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_PAYLOADS) >= 2, 30, "both images to start")
    time.sleep(0.5)
    children = subprocess.run(
        ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    thread.join(timeout=120)

    run = box[0]
    assert run.result["status"] == "success"
    assert worker.alive
    assert all(n <= 2 for n in generated(journal, plan["job_id"]).values())
    assert_costs_add_up(run, broker, images=2)


def test_redis_restart_mid_job(env, broker, journal, tmp_path, workers, load_plan) -> None:
    runner = JobRunner(broker.url)
    start_worker(env, runner, tmp_path, "steady", workers)
    plan = load_plan("typical_2x2")
    runner.client.send_task(
        "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
    )
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_PAYLOADS) >= 4, 30, "the images to start")
    broker.stop()
    time.sleep(3)
    broker.start()

    result = poll_result(runner, plan["job_id"], timeout_s=180)
    assert result["status"] == "success"
    assert all(n <= 2 for n in generated(journal, plan["job_id"]).values())
    run = JobRun(job_id=plan["job_id"], result=result)
    assert_costs_add_up(run, broker, images=4)


def test_each_task_delivered_twice_pays_and_uploads_once(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    runner = JobRunner(broker.url)
    start_worker(env, runner, tmp_path, "twice", workers, REFERENCE_GEN_CONCURRENCY="8")
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_PAYLOADS) >= 4, 30, "the images to start")
    payloads = [p for p in client.hvals(LEASE_PAYLOADS) if "generate_reference" in p]
    assert len(payloads) == 4
    for payload in payloads:  # a second delivery of each running header task
        runner.client.signature(__import__("json").loads(payload)).apply_async()
    thread.join(timeout=120)
    run = box[0]

    assert run.result["status"] == "success"
    assert len(run.of("reference_generation_complete")) == 4
    assert generated(journal, plan["job_id"]) == Counter(
        {
            k: 1
            for k in (
                "scene_city_street",
                "scene_rooftop",
                "character_protagonist",
                "character_antagonist",
            )
        }
    )
    storage = tmp_path / "storage" / "reference-images" / plan["job_id"]
    assert len(list(storage.glob("*.png"))) == 4
    assert_costs_add_up(run, broker, images=4)
    assert runner.client.AsyncResult(plan["job_id"]).get(timeout=10) == run.result


def poll_result(runner: JobRunner, job_id: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = runner.client.AsyncResult(job_id)
            if result.ready():
                return result.get(timeout=10)
        except (redis.RedisError, OSError):
            pass  # the broker is coming back
        time.sleep(0.5)
    pytest.fail(f"no result for {job_id} in {timeout_s} s")


def test_a_job_whose_images_are_lost_for_good_ends_at_its_deadline(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    runner = JobRunner(broker.url)
    start_worker(
        env, runner, tmp_path, "lonely", workers, REFERENCE_GEN_CONCURRENCY="1", JOB_DEADLINE_S="8"
    )
    plan = load_plan("typical_2x2")
    thread, box = in_background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_PAYLOADS) >= 1, 30, "the first image to start")
    client.delete("reference_generator")  # the three queued images vanish from the broker
    thread.join(timeout=60)
    run = box[0]

    assert run.result is None  # one image of four: text-only
    final = run.events[-1][1]
    assert (final["status"], final["successful_images"], final["failed_images"]) == ("failed", 1, 3)
    lost = run.of("reference_generation_failed")
    assert len(lost) == 3
    assert all("job deadline (8 s)" in event["reason"] for event in lost)
    assert runner.client.AsyncResult(plan["job_id"]).get(timeout=10) is None
    assert len([t for t in run.types if t == "stage_update"]) == 2  # finalized once
