"""Under load, a retry is not sent twice, and a copy does not hold a slot (issue 20, item 8).

One worker with one slot, fairness off (first in, first out), leases of 2 s, images of 6 s.
The first image fails its first attempt; its retry (due 2 s later) is published behind the
second image, and waits in the broker's list while the slot makes that one: 6 s, far past the
countdown plus a lease. Nobody holds the message then, so nobody renews its lease. The lease
handed to a sent retry covers its time in the queue, as the watchdog's re-sends do: the
watchdog does not count it lost and send it again (a copy that would then wait on the image's
lock, or run after it for nothing).

And a copy that does come (a re-send, a redelivery) while another delivery is making the
image steps aside at once: it sends itself again for later instead of holding a worker slot
while it polls the image's lock (for up to 160 s with the default settings)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import JobRun, JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLAKY = "forest"  # minimal_1x1's scene, the chord's first image: its first attempt fails


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:  # the test's own: no other worker takes its messages
        yield server


@pytest.fixture
def start_worker(broker: RedisServer, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(latency_s: int, slots: int, **env: str) -> WorkerProcess:
        environment = base_worker_env(broker.url, tmp_path / "storage")
        environment.update(
            GENERATOR_BACKEND="local",
            STORAGE_BACKEND="local",
            LOCAL_GENERATOR_LATENCY_S=str(latency_s),
            LOCAL_GENERATOR_JOURNAL=str(tmp_path / "generated.log"),
            REFERENCE_GEN_CONCURRENCY=str(slots),
            LEASE_TTL_S="2",
            **env,
        )
        process = WorkerProcess(environment, tmp_path / "worker.log", "single")
        started.append(process.start(JobRunner(broker.url).client))
        return process

    yield start
    for process in started:
        process.stop()


def made_once(tmp_path: Path) -> bool:
    """The local generator's journal: each image made once (one paid call each)."""
    made = [line.split()[1] for line in (tmp_path / "generated.log").read_text().splitlines()]
    return sorted(made) == ["character_singer", f"scene_{FLAKY}"]


def logged(worker: WorkerProcess, *events: str) -> list[dict[str, Any]]:
    """The worker's structured records of ``events``, in the order written (each line:
    Celery's prefix, then JSON)."""
    lines = worker.log_path.read_text(errors="replace").splitlines()
    wanted = [line for line in lines if any(f'"{event}"' in line for event in events)]
    records = [json.loads(line[line.index("{") :]) for line in wanted]
    return [r for r in records if r.get("event") in events]


def test_a_retry_waiting_in_the_queue_past_its_lease_is_not_sent_again(
    broker: RedisServer, start_worker, load_plan, tmp_path: Path
) -> None:
    worker = start_worker(6, 1, LOCAL_GENERATOR_FLAKY_IDS=FLAKY, REFERENCE_GEN_FAIRNESS="false")
    plan = load_plan("minimal_1x1")
    run = JobRunner(broker.url)(plan, timeout_s=90)

    assert run.result is not None and run.result["status"] == "success"
    # The retry waited behind the other image: it ran only once that one was made.
    order = [
        (t, d["image_id"])
        for t, d in run.events
        if t in (c.EVENT_IMAGE_RETRY, c.EVENT_IMAGE_COMPLETE)
    ]
    assert order == [
        (c.EVENT_IMAGE_RETRY, FLAKY),
        (c.EVENT_IMAGE_COMPLETE, "singer"),
        (c.EVENT_IMAGE_COMPLETE, FLAKY),
    ], order
    # The one retry was delivered once: the watchdog never found its lease expired.
    assert logged(worker, "lost_task_resent") == []
    assert made_once(tmp_path)


def test_a_copy_that_finds_the_image_being_made_steps_aside_at_once(
    broker: RedisServer, start_worker, load_plan, tmp_path: Path
) -> None:
    """Three slots, two images of 5 s: while the first is being made, a copy of its task is
    sent (as the watchdog sends one). The copy takes the free slot, finds the image's lock
    held, and ends at once; it looks again later, and ends for good once the image is in."""
    worker = start_worker(5, 3)
    plan = load_plan("minimal_1x1")
    runner = JobRunner(broker.url)
    runs: list[JobRun] = []
    follower = threading.Thread(target=lambda: runs.append(runner(plan, timeout_s=60)))
    follower.start()
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    task_id = f"{plan['job_id']}:scene_{FLAKY}"
    lock = c.JobKeys(plan["job_id"]).image_lock(f"scene_{FLAKY}")
    deadline = time.monotonic() + 30
    while not client.exists(lock):  # the first delivery is making the image
        assert time.monotonic() < deadline, "the image never started"
        time.sleep(0.05)
    _, payload = client.hget(c.LEASE_RECORDS, task_id).split(" ", 1)
    runner.client.signature(json.loads(payload)).apply_async()
    follower.join(60)

    assert runs and runs[0].result["status"] == "success"
    assert made_once(tmp_path)
    # In the worker's log, in order: the copy stepped aside before the image was made.
    order = [
        r["event"]
        for r in logged(worker, "image_held_by_other_delivery", "image_stored")
        if r.get("image") == f"scene_{FLAKY}"
    ]
    assert order[:1] == ["image_held_by_other_delivery"] and "image_stored" in order, order
