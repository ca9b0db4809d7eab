"""The network fails in ways a crash does not (issue 20): a publish while Redis is gone for a
few seconds. Real redis-server (with AOF, so queues survive its restart), real workers; the
fault is Redis stopped for 3 s exactly at the publish, held there by the test-only switch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tasks.harness import JobRunner, WorkerProcess, local_worker_env
from tasks.localredis import RedisServer
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
GONE_S = 3.0


@pytest.fixture
def broker() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def result_by_job_id(runner: JobRunner, job_id: str, timeout_s: float) -> Any:
    """The documented read, ``AsyncResult(job_id).get()``, riding out the broker's return."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = runner.client.AsyncResult(job_id)
            if result.ready():
                return result.get(timeout=10)
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"no result for {job_id} in {timeout_s} s")


def final_events(broker: RedisServer, job_id: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    entries = [json.loads(f["message"]) for _, f in client.xrange(c.events_stream(job_id))]
    return [
        e["data"]
        for e in entries
        if e["event_type"] == "stage_update" and e["data"]["status"] != "started"
    ]


@pytest.mark.parametrize(
    ("point", "flaky"),
    [("publish.start_chord", ""), ("publish.image_retry", "forest"), ("publish.callback", "")],
    ids=["chord", "retry", "callback"],
)
def test_redis_gone_for_3_s_at_a_publish(
    broker, workers, tmp_path: Path, load_plan, point: str, flaky: str
) -> None:
    """Issue 20, item 3: the publish meets Redis gone (kombu's OperationalError). It is
    retried until Redis is back, or the delivery keeps its lease for the watchdog: the job
    ends with its result under its id and one final event, never stranded until its
    deadline."""
    hold = tmp_path / "hold"
    env = local_worker_env(broker.url, tmp_path / "storage", latency_s=0.2)
    env.update(
        REFGEN_HOLD_AT=point,
        REFGEN_HOLD_FILE=str(hold),
        LOCAL_GENERATOR_FLAKY_IDS=flaky,
        LEASE_TTL_S="4",
        JOB_DEADLINE_S="110",
    )
    runner = JobRunner(broker.url)
    workers.append(WorkerProcess(env, tmp_path / "w.log", "w").start(runner.client))
    plan = load_plan("minimal_1x1")
    runner.client.send_task(
        c.TASK_START, kwargs={"job_id": plan["job_id"], "plan": plan, "duration_seconds": None}
    )
    wait_for(hold.exists, 30, f"a delivery to reach {point}")
    broker.stop()
    hold.unlink()  # the publish goes ahead, into a Redis that is not there
    time.sleep(GONE_S)
    broker.start()

    result = result_by_job_id(runner, plan["job_id"], timeout_s=45)
    assert result is not None and result["status"] == "success", result
    assert len(final_events(broker, plan["job_id"])) == 1
