"""A retry that waits in the queue longer than a lease's life is not sent again (issue 20, 8).

One worker with one slot, fairness off (first in, first out), leases of 2 s, images of 6 s.
The first image fails its first attempt; its retry (due 2 s later) is published behind the
second image, and waits in the broker's list while the slot makes that one: 6 s, far past the
countdown plus a lease. Nobody holds the message then, so nobody renews its lease. The lease
handed to a sent retry covers its time in the queue, as the watchdog's re-sends do: the
watchdog does not count it lost and send it again (a copy that would then wait on the image's
lock, or run after it for nothing)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLAKY = "forest"  # minimal_1x1's scene, the chord's first image: its first attempt fails


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:  # the test's own: no other worker takes its messages
        yield server


@pytest.fixture
def worker(broker: RedisServer, tmp_path: Path) -> Iterator[WorkerProcess]:
    env = base_worker_env(broker.url, tmp_path / "storage")
    env.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        LOCAL_GENERATOR_LATENCY_S="6",
        LOCAL_GENERATOR_FLAKY_IDS=FLAKY,
        LOCAL_GENERATOR_JOURNAL=str(tmp_path / "generated.log"),
        REFERENCE_GEN_CONCURRENCY="1",
        REFERENCE_GEN_FAIRNESS="false",
        LEASE_TTL_S="2",
    )
    process = WorkerProcess(env, tmp_path / "worker.log", "single")
    process.start(JobRunner(broker.url).client)
    yield process
    process.stop()


def logged(worker: WorkerProcess, event: str) -> list[dict[str, object]]:
    """The worker's structured records of ``event`` (each line: Celery's prefix, then JSON)."""
    lines = worker.log_path.read_text(errors="replace").splitlines()
    records = [json.loads(line[line.index("{") :]) for line in lines if f'"{event}"' in line]
    return [r for r in records if r.get("event") == event]


def test_a_retry_waiting_in_the_queue_past_its_lease_is_not_sent_again(
    broker: RedisServer, worker: WorkerProcess, load_plan, tmp_path: Path
) -> None:
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
    made = [line.split()[1] for line in (tmp_path / "generated.log").read_text().splitlines()]
    assert sorted(made) == ["character_singer", f"scene_{FLAKY}"]
