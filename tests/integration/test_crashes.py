"""Bad days, for real: killed workers, a restarted broker, tasks delivered twice.

Each test has its own redis-server (with AOF, so queues survive a restart) and its own workers.
The local generator journals every image it makes, so "never generated again" is counted, not
assumed. In each test the job ends with the right result, and its recorded cost equals the sum
of its images' costs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
from tasks.jobwatch import broker_lists
from tasks.localredis import RedisServer
from worker.constants import LEASE_RECORDS

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


class Background:
    """A job followed on a thread of its own; ``finish`` says what happened if it did not end."""

    def __init__(self, runner: JobRunner, plan: dict[str, Any], timeout_s: float = 240) -> None:
        self.plan, self.run, self.error = plan, None, None
        self.thread = threading.Thread(target=self._follow, args=(runner, timeout_s))
        self.thread.start()

    def _follow(self, runner: JobRunner, timeout_s: float) -> None:
        try:
            self.run = runner(self.plan, timeout_s=timeout_s)
        except BaseException as exc:  # kept for finish(): a thread's exception is otherwise lost
            self.error = exc

    def finish(self, timeout_s: float, *logs: Path) -> JobRun:
        self.thread.join(timeout=timeout_s)
        if self.run is None:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            state = "still running" if self.thread.is_alive() else f"failed: {self.error!r}"
            pytest.fail(f"job {self.plan['job_id']} did not end ({state})\n{tails}")
        return self.run


def journal_of(journal: Path, job_id: str, images: int) -> Counter[str]:
    counts = generated(journal, job_id)
    assert len(counts) == images, f"the journal shows {dict(counts)}, not {images} images"
    return counts


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
    job = Background(runner, plan)
    wait_for(lambda: sum(generated(journal, plan["job_id"]).values()) >= 4, 60, "round one")
    done_before = set(generated(journal, plan["job_id"]))
    time.sleep(0.5)  # round two is generating
    os.killpg(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rescuer = start_worker(env, runner, tmp_path, "rescuer", workers)
    run = job.finish(240, first.log_path, rescuer.log_path)
    recovery_s = time.monotonic() - killed_at
    print(f"\nwhole-worker SIGKILL: job finished {recovery_s:.1f} s after the kill")

    assert run.result["status"] == "success"
    counts = journal_of(journal, plan["job_id"], images=8)
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
    job = Background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_RECORDS) >= 2, 30, "both images to start")
    time.sleep(0.5)
    assert_leases_resend_as_shown(client, plan["job_id"], images=2)  # taken by the children
    children = subprocess.run(
        ["pgrep", "-P", str(worker.process.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert children
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    run = job.finish(120, worker.log_path)

    assert run.result["status"] == "success"
    assert worker.alive
    assert all(n <= 2 for n in journal_of(journal, plan["job_id"], images=2).values())
    assert_costs_add_up(run, broker, images=2)


def assert_leases_resend_as_shown(client: redis.Redis, job_id: str, images: int) -> None:
    """What the watchdog would send again for each image shows it as its first send did: its
    summary, not its spec (no prompt in Flower after a re-send either)."""

    def leased() -> dict[str, str]:
        records = client.hgetall(LEASE_RECORDS)
        return {t: r for t, r in records.items() if t.startswith(f"{job_id}:")}

    wait_for(lambda: len(leased()) == images, 30, "every image leased")
    for task_id, record in leased().items():
        options = json.loads(record.split(" ", 1)[1])["options"]
        key = task_id.removeprefix(f"{job_id}:")
        assert (options["argsrepr"], options["kwargsrepr"]) == (f"(<{key} of job {job_id}>,)", "{}")


def test_redis_restart_mid_job(env, broker, journal, tmp_path, workers, load_plan) -> None:
    runner = JobRunner(broker.url)
    start_worker(env, runner, tmp_path, "steady", workers)
    plan = load_plan("typical_2x2")
    runner.client.send_task(
        "reference_generator.start", kwargs={"job_id": plan["job_id"], "plan": plan}
    )
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_RECORDS) >= 4, 30, "the images to start")
    assert_leases_resend_as_shown(client, plan["job_id"], images=4)
    broker.stop()
    time.sleep(3)
    broker.start()

    result = poll_result(runner, plan["job_id"], timeout_s=180)
    assert result["status"] == "success"
    assert all(n <= 2 for n in journal_of(journal, plan["job_id"], images=4).values())
    run = JobRun(job_id=plan["job_id"], result=result)
    assert_costs_add_up(run, broker, images=4)


def test_each_task_delivered_twice_pays_and_uploads_once(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    runner = JobRunner(broker.url)
    start_worker(env, runner, tmp_path, "twice", workers, REFERENCE_GEN_CONCURRENCY="8")
    plan = load_plan("typical_2x2")
    job = Background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_RECORDS) >= 4, 30, "the images to start")
    records = [r for r in client.hvals(LEASE_RECORDS) if "generate_reference" in r]
    assert len(records) == 4
    for record in records:  # a second delivery of each running header task
        _, payload = record.split(" ", 1)
        runner.client.signature(json.loads(payload)).apply_async()
    run = job.finish(120, tmp_path / "twice.log")

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
    job = Background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(
        lambda: any("generate_reference" in r for r in client.hvals(LEASE_RECORDS)),
        30,
        "the first image to start",
    )
    # The three queued images vanish from the broker, at whatever priority they wait.
    client.delete(*broker_lists("reference_generator"))
    run = job.finish(60, tmp_path / "lonely.log")

    assert run.result is None  # one image of four: text-only
    final = run.events[-1][1]
    assert (final["status"], final["successful_images"], final["failed_images"]) == ("failed", 1, 3)
    lost = run.of("reference_generation_failed")
    assert len(lost) == 3
    assert all("job deadline (8 s)" in event["reason"] for event in lost)
    assert runner.client.AsyncResult(plan["job_id"]).get(timeout=10) is None
    assert len([t for t in run.types if t == "stage_update"]) == 2  # finalized once


def test_a_worker_with_free_slots_survives_a_redis_restart(
    env, broker, journal, tmp_path, workers, load_plan
) -> None:
    """Two images on four slots: the worker is waiting in BRPOP for more when Redis goes.
    kombu's channel close used to crash the worker there ("Unrecoverable error")."""
    runner = JobRunner(broker.url)
    worker = start_worker(env, runner, tmp_path, "idle", workers)
    plan = load_plan("minimal_1x1")
    job = Background(runner, plan)
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    wait_for(lambda: client.hlen(LEASE_RECORDS) >= 2, 30, "the images to start")
    broker.stop()
    time.sleep(2)
    broker.start()
    result = poll_result(runner, plan["job_id"], timeout_s=120)
    job.thread.join(timeout=5)  # pub/sub saw nothing while Redis was away: the result says
    assert result["status"] == "success"
    log = worker.log_path.read_text()
    assert worker.alive, log[-3000:]
    assert "Unrecoverable error" not in log
    after = runner(load_plan("minimal_1x1"), timeout_s=60)  # and it keeps taking work
    assert after.result["status"] == "success"


THIEF = """
import os, signal
from tasks.app import app
with app.connection_for_read() as connection:
    def die_holding_it(body, message):
        os.kill(os.getpid(), signal.SIGKILL)  # taken from the queue, never acked, never leased
    queue = app.amqp.queues["reference_generator"]
    with connection.Consumer(queue, callbacks=[die_holding_it], accept=["json"]):
        connection.drain_events(timeout=20)
"""


def test_a_message_taken_by_a_worker_that_died_before_leasing_it_is_put_back(
    env, broker, tmp_path, workers, load_plan
) -> None:
    """The instant between the broker's pop and the worker's receipt: the message sits in
    kombu's unacked set with no lease. The watchdog puts it back long before the broker's
    10-minute visibility timeout would."""
    runner = JobRunner(broker.url)
    plan = load_plan("minimal_1x1")
    runner.client.send_task(
        "reference_generator.start",
        kwargs={"job_id": plan["job_id"], "plan": plan},
        queue="reference_generator",
    )
    thief = subprocess.run(
        [sys.executable, "-c", THIEF], env=env, capture_output=True, text=True, timeout=60
    )
    assert thief.returncode == -signal.SIGKILL, thief.stderr[-2000:]
    client = redis.Redis.from_url(broker.url, decode_responses=True)
    assert client.zcard("unacked_index") == 1  # the start message, held by nobody alive
    worker = start_worker(env, runner, tmp_path, "rescuer", workers)
    result = poll_result(runner, plan["job_id"], timeout_s=60)
    assert result["status"] == "success"
    assert "orphaned_message_restored" in worker.log_path.read_text()
