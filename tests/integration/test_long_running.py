"""A worker that runs for months: launching a job leaves nothing behind, and a worker that
retires hands over mid-stream without losing or repeating anything.

Each has a redis-server of its own, so every channel and key on it is theirs.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import JobFeeder, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from tests.conftest import PLANS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

IMAGE_KEYS = (
    "character_antagonist",
    "character_protagonist",
    "scene_city_street",
    "scene_rooftop",
)  # typical_2x2


def worker_env(broker: RedisServer, tmp: Path) -> dict[str, str]:
    env = base_worker_env(broker.url, tmp / "storage")
    env.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_JOURNAL=str(tmp / "generated.log"),
    )
    return env


@dataclass
class Finished:
    """Jobs that ran through an inspected worker on a server of their own, and what is left."""

    broker: RedisServer
    feeder: JobFeeder
    worker: WorkerProcess


@pytest.fixture(scope="module")
def thirty_jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    tmp = tmp_path_factory.mktemp("thirty-jobs")
    with RedisServer() as broker:
        worker = WorkerProcess(
            {**worker_env(broker, tmp), "LOCAL_GENERATOR_LATENCY_S": "0.02"},
            tmp / "worker.log",
            "inspected",
            module="tests.integration.inspected_worker",
        )
        plan = json.loads((PLANS / "typical_2x2.json").read_text())
        feeder = JobFeeder(broker.url, plan, in_flight=4)
        worker.start(feeder.client)
        try:
            feeder.run(30, timeout_s=120)
            yield Finished(broker, feeder, worker)
        finally:
            worker.stop()


def results_held(finished: Finished) -> dict[str, int]:
    hostname = finished.worker.hostname
    replies = finished.feeder.client.control.broadcast(
        "results_held", destination=[hostname], reply=True, timeout=5
    )
    assert replies, "the worker did not answer"
    held: dict[str, int] = replies[0][hostname]
    return held


def test_launching_jobs_leaves_no_pending_result_and_no_subscription(
    thirty_jobs: Finished,
) -> None:
    feeder = thirty_jobs.feeder
    assert not feeder.failed
    assert all(result["status"] == "success" for result in feeder.results.values())
    held = results_held(thirty_jobs)
    assert held["backends"] >= 1  # the inspection found the worker's backends
    assert held == {**held, "pending_results": 0, "subscribed": 0, "unread_unsubscribes": 0}
    server = redis.Redis.from_url(thirty_jobs.broker.url, decode_responses=True)
    ours = [f"celery-task-meta-{job_id}" for job_id in feeder.results] + [
        f"celery-task-meta-{job_id}:{key}" for job_id in feeder.results for key in IMAGE_KEYS
    ]
    assert server.exists(*ours) == len(ours)  # these are the jobs' real task ids
    assert all(count == 0 for _, count in server.pubsub_numsub(*ours))
    assert server.pubsub_channels("celery-task-meta-*") == []


# Keys of fixed names, one each however many jobs run.
FIXED_KEYS = {
    "refgen:metrics",  # a hash of counters
    "refgen:retention",  # one entry a job, removed by the purge when the job's objects go
}


def test_every_key_a_job_leaves_expires(thirty_jobs: Finished) -> None:
    server = redis.Redis.from_url(thirty_jobs.broker.url, decode_responses=True)
    lasting = {key for key in server.scan_iter(count=1000) if server.ttl(key) == -1}
    assert lasting - FIXED_KEYS == {k for k in lasting if k.startswith("_kombu.binding")}
    ttls = [server.ttl(key) for key in server.scan_iter(count=1000) if key not in lasting]
    assert len(ttls) >= 30 * 14  # the jobs' keys are there, each with its expiry
    assert max(ttls) <= 7 * 24 * 3600  # JOB_STATE_TTL_S


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def generated(journal: Path) -> Counter[tuple[str, str]]:
    lines = [line.split() for line in journal.read_text().splitlines()]
    return Counter((job, key) for job, key, *_ in lines)


def assert_job_ended_right(server: redis.Redis, job_id: str, result: Any) -> None:
    assert result["status"] == "success", job_id
    references = result["scene_references"] + result["character_references"]
    assert len(references) == 4
    total = sum((Decimal(r["cost"]) for r in references), Decimal(0))
    assert Decimal(result["total_cost"]) == total == Decimal("0.02")
    assert len(server.hgetall(f"refgen:job:{{{job_id}}}:charges")) == 4
    ledger = server.hgetall(f"refgen:job:{{{job_id}}}:ledger")
    assert Decimal(int(ledger["spent"])) / 10**9 == total


def feed_until_it_exits(worker: WorkerProcess, feeder: JobFeeder, jobs: int) -> dict[str, Any]:
    """Keep jobs coming until ``worker`` exits on its own; its one ``worker_retiring`` line."""
    assert worker.process is not None
    deadline = time.monotonic() + 60
    while worker.process.poll() is None:
        assert time.monotonic() < deadline, "the worker did not retire"
        feeder.collect()
        while len(feeder.pending) < feeder.in_flight and feeder.done + len(feeder.pending) < jobs:
            feeder.send()
        time.sleep(0.05)
    assert worker.process.returncode == 0  # a clean exit, for the supervisor to restart
    retiring = [
        json.loads(line[line.index("{") :])
        for line in worker.log_path.read_text().splitlines()
        if '"event": "worker_retiring"' in line
    ]
    assert len(retiring) == 1
    return retiring[0]


def assert_every_job_ended_right_once(feeder: JobFeeder, broker: RedisServer, tmp: Path) -> None:
    assert not feeder.failed and not feeder.pending
    server = redis.Redis.from_url(broker.url, decode_responses=True)
    for job_id, result in feeder.results.items():
        assert_job_ended_right(server, job_id, result)
    # Nothing was left half done, so nothing was made twice.
    made = generated(tmp / "generated.log")
    assert set(made) == {(job, key) for job in feeder.results for key in IMAGE_KEYS}
    assert set(made.values()) == {1}


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_retiring_worker_finishes_what_it_holds_and_a_new_one_takes_over(
    pool, broker, tmp_path, workers, load_plan
) -> None:
    env = {
        **worker_env(broker, tmp_path),
        "LOCAL_GENERATOR_LATENCY_S": "0.3",
        "REFERENCE_GEN_POOL": pool,
    }
    feeder = JobFeeder(broker.url, load_plan(), in_flight=3)
    first = WorkerProcess({**env, "WORKER_MAX_JOBS": "4"}, tmp_path / "first.log", "retiring")
    workers.append(first.start(feeder.client))

    retiring = feed_until_it_exits(first, feeder, jobs=10)
    assert retiring["jobs"] == 4 and "WORKER_MAX_JOBS=4" in retiring["reason"]
    assert feeder.done < 10  # mid-stream: jobs were still open when it left

    # What a supervisor does: start a fresh worker.
    workers.append(WorkerProcess(env, tmp_path / "second.log", "fresh").start(feeder.client))
    feeder.run(10, timeout_s=120)
    assert_every_job_ended_right_once(feeder, broker, tmp_path)


def test_a_worker_past_its_memory_bound_retires(broker, tmp_path, workers, load_plan) -> None:
    env = {**worker_env(broker, tmp_path), "LOCAL_GENERATOR_LATENCY_S": "0.1"}
    feeder = JobFeeder(broker.url, load_plan(), in_flight=2)
    # Any real worker is past 1 MB: it retires on the first task it takes.
    first = WorkerProcess({**env, "WORKER_MAX_MEMORY_MB": "1"}, tmp_path / "first.log", "big")
    workers.append(first.start(feeder.client))

    retiring = feed_until_it_exits(first, feeder, jobs=2)
    assert "WORKER_MAX_MEMORY_MB=1" in retiring["reason"]
    assert retiring["memory_mb"] > 20  # the worker's PSS, read from /proc

    workers.append(WorkerProcess(env, tmp_path / "second.log", "fresh").start(feeder.client))
    feeder.run(2, timeout_s=60)
    assert_every_job_ended_right_once(feeder, broker, tmp_path)
