"""The backlog gauges on the gateway's /metrics against a real worker holding messages, with
priorities in use: what they show is what was sent minus what finished.

Three jobs are sent before any worker runs: three ``start`` messages wait. Then a worker with
two slots starts. Every ``start`` runs (they go first) and sends its images at its job's
priority; the 2-image job's images go next and are refused at once by the "content filter", so
that job ends and its ``finalize`` runs; the 4-image job's images come next, and the first two
hold the two slots (each takes minutes). What is left waits: two images of the 4-image job and
the eight of the 8-image job, at two priority levels."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tasks.harness import JobRunner, WorkerProcess, base_worker_env
from tasks.localredis import RedisServer, free_port
from tests.integration.gatewaykit import running_gateway
from tests.integration.test_flower import broker
from tests.integration.test_replicate_path import wait_for
from worker import constants as c
from worker.backlog import priority_lists

__all__ = ["broker"]  # a redis-server of the test's own: no other worker takes its messages
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def env(broker: RedisServer, tmp_path: Path) -> dict[str, str]:
    environment = base_worker_env(broker.url, tmp_path / "storage")
    environment.update(
        GENERATOR_BACKEND="local",
        STORAGE_BACKEND="local",
        REFERENCE_GEN_CONCURRENCY="2",
        LOCAL_GENERATOR_LATENCY_S="300",  # an image holds its slot for the whole test
        IMAGE_TIMEOUT_S="600",
        LOCAL_GENERATOR_REJECT_IDS="forest,singer",  # the 2-image job's scene and character
    )
    return environment


@pytest.fixture
def gateway(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with running_gateway(env, tmp_path / "gateway.log", free_port()) as url:
        yield url


def gauges(url: str) -> dict[str, dict[str, float]]:
    """{metric: {queue: value}} for the backlog gauges."""
    found: dict[str, dict[str, float]] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name.startswith("refgen_queue_"):
            for sample in family.samples:
                found.setdefault(sample.name, {})[sample.labels["queue"]] = sample.value
    return found


def test_the_gauges_are_what_was_sent_minus_what_finished(
    broker, env, gateway, load_plan, tmp_path: Path
) -> None:
    runner = JobRunner(broker.url)
    plans = [load_plan("minimal_1x1"), load_plan("typical_2x2"), load_plan("large_5x3")]
    for plan in plans:
        runner.client.send_task(
            c.TASK_START, kwargs={"job_id": plan["job_id"], "plan": plan}, ignore_result=True
        )
    before = gauges(gateway)
    assert before["refgen_queue_messages_waiting"] == {"reference_generator": 0, "celery": 3}
    assert sum(before["refgen_queue_messages_unacked"].values()) == 0
    # Sent by a bare client, unstamped: they age from when the gateway first saw them.
    later = gauges(gateway)["refgen_queue_oldest_message_age_seconds"]["celery"]
    assert later > before["refgen_queue_oldest_message_age_seconds"]["celery"]

    worker = WorkerProcess(env, tmp_path / "worker.log", "held")
    try:
        worker.start(runner.client)
        inspect = runner.client.control.inspect(destination=[worker.hostname], timeout=2)
        small, typical = plans[0]["job_id"], plans[1]["job_id"]

        def settled() -> bool:
            log = worker.log_path.read_text()
            active = (inspect.active() or {}).get(worker.hostname, [])
            return (
                f"reference_generator.finalize[{small}] succeeded" in log
                and len(active) == 2
                and all(t["id"].startswith(f"{typical}:") for t in active)
            )

        wait_for(settled, 60, "both slots held by the 4-image job, the 2-image job finalized")
        held = len((inspect.active() or {})[worker.hostname])
        reserved = len((inspect.reserved() or {}).get(worker.hostname, []))
        scheduled = len((inspect.scheduled() or {}).get(worker.hostname, []))

        # Sent: 3 starts, 2 + 4 + 8 images, the 2-image job's finalize. Finished: the starts,
        # its two images, its finalize. Held by the worker, by its own account: 2.
        sent, finished = 3 + 14 + 1, 3 + 2 + 1
        now = gauges(gateway)
        waiting, unacked = (
            now["refgen_queue_messages_waiting"],
            now["refgen_queue_messages_unacked"],
        )
        assert unacked["reference_generator"] == held + reserved + scheduled == 2
        assert sum(waiting.values()) + sum(unacked.values()) == sent - finished
        assert waiting == {"reference_generator": 10, "celery": 0}
        # Priorities were in use: the waiting images are on two lists of the queue.
        lengths = [runner.client.backend.client.llen(n) for n in priority_lists(c.DEFAULT_QUEUE)]
        assert sorted(n for n in lengths if n) == [2, 8]
        # Stamped by the worker that sent them: the images' wait, growing.
        ages = [now["refgen_queue_oldest_message_age_seconds"]["reference_generator"]]
        ages.append(
            gauges(gateway)["refgen_queue_oldest_message_age_seconds"]["reference_generator"]
        )
        assert 0 < ages[0] <= ages[1]
        assert now["refgen_queue_oldest_message_age_seconds"]["celery"] == 0
    finally:
        if worker.process is not None and worker.alive:
            os.killpg(worker.process.pid, signal.SIGKILL)  # its images would hold it for minutes
            worker.process.wait()


def heartbeats(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "refgen_worker_heartbeat_age_seconds"
        for sample in family.samples
    }


def test_a_worker_that_dies_goes_silent_and_one_that_stops_is_gone(
    broker, env, gateway, tmp_path: Path
) -> None:
    env = {**env, "LEASE_TTL_S": "2"}  # a beat every 0.5 s
    runner = JobRunner(broker.url)
    alive = WorkerProcess(env, tmp_path / "alive.log", "alive").start(runner.client)
    killed = WorkerProcess(env, tmp_path / "killed.log", "killed").start(runner.client)
    try:
        wait_for(
            lambda: {alive.hostname, killed.hostname} <= set(heartbeats(gateway)),
            30,
            "both workers beating",
        )
        assert killed.process is not None
        os.killpg(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
        wait_for(lambda: heartbeats(gateway)[killed.hostname] > 3, 30, "the dead one silent")
        ages = heartbeats(gateway)
        assert ages[alive.hostname] < ages[killed.hostname]

        alive.stop()  # a clean stop: it says goodbye
        assert alive.hostname not in heartbeats(gateway)
        assert killed.hostname in heartbeats(gateway)
    finally:
        alive.stop()
