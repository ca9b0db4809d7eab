"""Fair under load, on real workers: one 48-image job sent just before ten 2-image jobs, all
by name without a priority, as upstream sends them.

The order is asserted, not timings: with fairness every small job ends before the big job's
last image starts (with one worker, with two, and with a retry in the big job, which also
runs before the big job's last fresh image starts); without it, they do not. Times come from
``published_at``, the Redis clock every event is stamped with.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import WorkerProcess, bare_client, base_worker_env
from tasks.jobwatch import JobWatch, Timeline, sized_plan
from tasks.localredis import RedisServer
from worker import constants as c
from worker.fairness import image_priority

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BIG_FLAKY = "big_scene_0"  # the big job's first image fails its first attempt


def worker_env(broker: RedisServer, tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = base_worker_env(broker.url, tmp_path / "storage")
    env.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_LATENCY_S="0.2",
        LOCAL_GENERATOR_FLAKY_IDS=BIG_FLAKY,
        REFERENCE_GEN_CONCURRENCY="4",
        LOG_LEVEL="WARNING",
        **overrides,
    )
    return env


class Cluster:
    def __init__(self, broker: RedisServer, tmp_path: Path) -> None:
        self.broker, self.tmp_path = broker, tmp_path
        self.client = bare_client(broker.url)
        self.workers: list[WorkerProcess] = []

    def add_worker(self, **overrides: str) -> None:
        name = f"w{len(self.workers)}"
        env = worker_env(self.broker, self.tmp_path, **overrides)
        worker = WorkerProcess(env, self.tmp_path / f"{name}.log", name)
        self.workers.append(worker.start(self.client))

    def run(self, *, big_flaky: bool = False) -> tuple[Timeline, list[Timeline]]:
        """The big job, then at once the ten small ones; returns their timelines."""
        big = sized_plan(24, 24, label="big" if big_flaky else "large")
        smalls = [sized_plan(1, 1, label=f"small{i}") for i in range(10)]
        watch = JobWatch(self.broker.url, self.client)
        try:
            for plan in [big, *smalls]:
                watch.send(plan)
            jobs = watch.wait(timeout_s=120)
        finally:
            watch.close()
        return jobs[big["job_id"]], [jobs[p["job_id"]] for p in smalls]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with RedisServer() as broker:
        made = Cluster(broker, tmp_path)
        try:
            yield made
        finally:
            made.stop()


def last_image_start(job: Timeline) -> float:
    starts = job.published(c.EVENT_IMAGE_START)
    assert len(starts) == 48
    return max(starts)


def ended_before(smalls: list[Timeline], moment: float) -> list[bool]:
    return [small.end[1] < moment for small in smalls]


def assert_all_succeeded(big: Timeline, smalls: list[Timeline]) -> None:
    for job in [big, *smalls]:
        assert job.end[0]["result_status"] == "success", job.end[0]


def test_small_jobs_end_before_the_big_jobs_last_image_starts(cluster: Cluster) -> None:
    cluster.add_worker()
    big, smalls = cluster.run()
    assert_all_succeeded(big, smalls)
    assert all(ended_before(smalls, last_image_start(big)))


def test_the_same_with_two_workers(cluster: Cluster) -> None:
    cluster.add_worker()
    cluster.add_worker()
    big, smalls = cluster.run()
    assert_all_succeeded(big, smalls)
    assert all(ended_before(smalls, last_image_start(big)))


class LeaseSampler:
    """Reads every lease record while the jobs run: the message each lease would send again."""

    def __init__(self, broker: RedisServer) -> None:
        self._redis = redis.Redis.from_url(broker.url, decode_responses=True)
        self.priorities: dict[str, set[int | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LeaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._redis.close()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for task_id, record in self._redis.hgetall(c.LEASE_RECORDS).items():
                message = json.loads(record.split(" ", 1)[1])
                priority = message.get("options", {}).get("priority")
                self.priorities.setdefault(task_id, set()).add(priority)


def test_a_retry_in_the_big_job_keeps_its_place(cluster: Cluster) -> None:
    cluster.add_worker()
    with LeaseSampler(cluster.broker) as leases:
        big, smalls = cluster.run(big_flaky=True)
    assert_all_succeeded(big, smalls)
    last_start = last_image_start(big)
    assert all(ended_before(smalls, last_start))
    # Its retry ran when due, before the fresh images queued behind it had all started.
    assert len(big.published(c.EVENT_IMAGE_RETRY, image_id=BIG_FLAKY)) == 1
    [retried] = big.published(c.EVENT_IMAGE_COMPLETE, image_id=BIG_FLAKY)
    assert retried < last_start
    # What the watchdog would send again keeps the priority: the retry's at the top, the
    # images' at their job's size class.
    retry_task = f"{big.job_id}:scene_{BIG_FLAKY}"
    assert c.PRIORITY_TOP in leases.priorities[retry_task]
    big_images = {
        priorities
        for task_id, seen in leases.priorities.items()
        if task_id.startswith(f"{big.job_id}:") and task_id != retry_task
        for priorities in seen
    }
    assert big_images == {image_priority(48)}


def test_without_fairness_the_small_jobs_wait_for_the_big_one(cluster: Cluster) -> None:
    cluster.add_worker(REFERENCE_GEN_FAIRNESS="false")
    big, smalls = cluster.run()
    assert_all_succeeded(big, smalls)
    assert not all(ended_before(smalls, last_image_start(big)))
