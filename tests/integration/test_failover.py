"""A Redis failover under a running job: one primary, one replica and three Sentinels (all real
``redis-server`` processes), real ``refgen worker`` and ``refgen gateway`` processes reaching
them through Sentinel, the Replicate-like server, and the primary SIGKILLed as a lost machine.

The job must end with the right result, read by job id through Sentinel; each image's
prediction created once; the recorded cost the sum of what the provider billed; and a browser's
SSE stream must carry on to the final event.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from tasks.harness import WorkerProcess, bare_client, replicate_worker_env
from tasks.localredis import free_port
from tests.fakes.replicate_server import FakeReplicate
from tests.integration.campaign import wait_for
from tests.integration.gatewaykit import Sse, running_gateway, wait_known
from tests.integration.sentinel import MASTER, SentinelCluster
from worker import constants as c
from worker.budget import from_nano, to_nano
from worker.services import redis_client
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PRICE = c.DEFAULT_HARDWARE_PRICE_PER_S
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "r8_" + secrets.token_hex(16)


@dataclass
class Stack:
    cluster: SentinelCluster
    replicate: FakeReplicate
    client: Celery
    gateway: str
    worker: WorkerProcess
    standby: Callable[[], WorkerProcess]

    def send(self, plan: dict[str, Any]) -> None:
        self.client.send_task(
            c.TASK_START,
            kwargs={"job_id": plan["job_id"], "plan": plan, "duration_seconds": 180},
        )

    def result(self, job_id: str, timeout_s: float = 120) -> Any:
        return self.client.AsyncResult(job_id).get(timeout=timeout_s)

    def watch(self, job_id: str) -> Callable[[], Sse]:
        """A browser's SSE stream of the job, opened once the gateway knows the job, read on
        a thread."""
        sse = Sse()
        done = threading.Event()

        def read() -> None:
            wait_known(self.gateway, job_id)
            url = f"{self.gateway}/jobs/{job_id}/events"
            with httpx.stream("GET", url, timeout=httpx.Timeout(60, connect=5)) as response:
                sse.read(response)
            done.set()

        threading.Thread(target=read, daemon=True).start()

        def join() -> Sse:
            assert done.wait(90), f"the SSE stream never ended: {[m for m in sse.messages][-3:]}"
            return sse

        return join


@pytest.fixture
def hold_at() -> str | None:
    """The point where the worker stops, once, for the test (REFGEN_HOLD_AT); None: nowhere."""
    return None


@pytest.fixture
def stack(tmp_path: Path, hold_at: str | None) -> Iterator[Stack]:
    with (
        SentinelCluster(password="pw-" + secrets.token_hex(8)) as cluster,
        FakeReplicate(api_token=TOKEN, duration_range=(1.5, 2.5), seed=3) as replicate,
    ):
        # REDIS_URL names a server that is not there: Sentinel must win over it.
        env = replicate_worker_env(
            "redis://127.0.0.1:1/0", tmp_path / "storage", replicate.url, TOKEN
        )
        env.update(
            cluster.env(),
            LEASE_TTL_S="4",
            # Long enough for a test to kill the primary while a write waits for its replica.
            REDIS_WAIT_TIMEOUT_MS="3000",
        )
        if hold_at is not None:
            env.update(REFGEN_HOLD_AT=hold_at, REFGEN_HOLD_FILE=str(tmp_path / "held"))
        client = bare_client(cluster.celery_url, sentinel_master=MASTER)
        workers = [WorkerProcess(env, tmp_path / "worker.log", "failover").start(client)]

        def standby() -> WorkerProcess:
            workers.append(WorkerProcess(env, tmp_path / "standby.log", "standby").start(client))
            return workers[-1]

        try:
            with running_gateway(env, tmp_path / "gateway.log", free_port()) as gateway:
                yield Stack(cluster, replicate, client, gateway, workers[0], standby)
        finally:
            for worker in workers:
                worker.stop()
    logs = "".join(
        (tmp_path / name).read_text()
        for name in ("worker.log", "standby.log", "gateway.log")
        if (tmp_path / name).exists()
    )
    assert "Traceback" not in logs, logs[-4000:]
    assert cluster.password not in logs  # type: ignore[operator]


def billed(replicate: FakeReplicate) -> Decimal:
    """What the provider billed, each prediction rounded up to the nano-dollar as recorded."""
    bills = replicate.bills(PRICE)
    return sum(
        (from_nano(to_nano(bills[call.prediction_id])) for call in replicate.creates), Decimal(0)
    )


def assert_paid_once_and_complete(stack: Stack, plan: dict[str, Any], result: Any) -> None:
    images = len(plan["scenes"]) + len(plan["characters"])
    assert result is not None and result["status"] == "success", result
    assert result["total_references"] == images
    prompts = Counter(call.input["prompt"] for call in stack.replicate.creates)
    assert len(prompts) == images and set(prompts.values()) == {1}, prompts
    assert Decimal(result["total_cost"]) == billed(stack.replicate)


def test_a_job_survives_its_primary_killed_with_predictions_in_flight(
    stack, load_plan, tmp_path
) -> None:
    """Sent and followed by ``refgen run`` through Sentinel, watched by a browser's stream."""
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env.update(stack.cluster.env(), REDIS_URL="redis://127.0.0.1:1/0")
    run = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", str(tmp_path / "plan.json")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sse = stack.watch(job_id)
    wait_for(lambda: len(stack.replicate.creates) >= 2, 30, "predictions in flight")
    old = stack.cluster.kill_primary()
    stack.cluster.wait_for_failover(old)

    printed, said = run.communicate(timeout=150)
    assert run.returncode == 0, said
    result = stack.result(job_id)
    assert json.loads(printed) == result
    assert_paid_once_and_complete(stack, plan, result)
    final = sse().messages[-1]
    assert final["event_type"] == "stage_update" and final["data"]["status"] == "completed"
    assert Decimal(final["data"]["total_cost"]) == Decimal(result["total_cost"])
    assert stack.cluster.password not in printed + said  # type: ignore[operator]


def _charged(cluster: SentinelCluster, port: int, job_id: str) -> bool:
    return cluster.node(port).hlen(c.JobKeys(job_id).charges) >= 1


def _outcome_recorded(cluster: SentinelCluster, port: int, job_id: str) -> bool:
    return cluster.node(port).hlen(c.JobKeys(job_id).images) >= 1


def _committed(cluster: SentinelCluster, port: int, job_id: str) -> bool:
    return bool(cluster.node(port).exists(c.JobKeys(job_id).result))


WORST_MOMENTS = {
    # held at this point, then the replica paused, then the write awaited on the primary
    "right-after-a-charge": ("image.after_prediction_created", _charged),
    "right-after-an-outcome": ("image.after_charge", _outcome_recorded),
    "during-finalize": ("finalize.before_commit", _committed),
}


@pytest.mark.parametrize(
    ("hold_at", "landed"), list(WORST_MOMENTS.values()), ids=list(WORST_MOMENTS)
)
def test_a_write_the_replica_never_got_is_not_lost_with_the_primary(
    stack, load_plan, tmp_path, hold_at, landed
) -> None:
    """The worst moments: the worker is held just before the write, the replica falls behind,
    so the write lands on the primary alone, and the primary dies at once. The write waits
    for a replica (WAIT) on the same connection, so it is never taken as done; it is written
    again on the new primary."""
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    stack.send(plan)
    sse = stack.watch(job_id)
    held = tmp_path / "held"
    wait_for(held.exists, 60, f"the worker to reach {hold_at}")
    primary = stack.cluster.primary()
    assert primary == stack.cluster.primary_port
    replica = stack.cluster.hold_back_replica()
    try:
        held.unlink()
        wait_for(lambda: landed(stack.cluster, primary, job_id), 60, landed.__name__)
        stack.cluster.kill_primary()
    finally:
        stack.cluster.resume(replica)
    stack.cluster.wait_for_failover(primary)

    result = stack.result(job_id)
    assert_paid_once_and_complete(stack, plan, result)
    assert landed(stack.cluster, replica, job_id)
    final = sse().messages[-1]
    assert final["event_type"] == "stage_update" and final["data"]["status"] == "completed"


def test_a_command_in_flight_at_the_failover_is_answered_by_the_new_primary() -> None:
    """redis-py reconnects a retried command to the address it had (redis/redis-py#3874): to
    the dead primary, until its retries run out. Ours asks the Sentinels again."""
    with SentinelCluster() as cluster:
        settings = Settings(redis_sentinels=cluster.sentinels, redis_sentinel_master=MASTER)
        client = redis_client(settings)
        assert client.ping()
        answers: list[object] = []

        def wait_for_a_value() -> None:
            try:
                answers.append(client.blpop(["handover"], timeout=20))
            except redis.RedisError as exc:
                answers.append(exc)

        waiter = threading.Thread(target=wait_for_a_value)
        waiter.start()
        primary = cluster.node(cluster.primary_port)
        wait_for(lambda: any(c["cmd"] == "blpop" for c in primary.client_list()), 10, "the BLPOP")
        new = cluster.wait_for_failover(cluster.kill_primary())
        cluster.node(new).rpush("handover", "here")
        waiter.join(timeout=60)
        assert answers == [("handover", "here")]


@pytest.mark.parametrize("hold_at", ["image.after_reservation"])
def test_a_prediction_intent_outlives_the_primary_lost_with_its_worker(
    stack, load_plan, tmp_path, hold_at
) -> None:
    """One machine lost with the Redis primary and a worker on it, right after the worker
    wrote an image's prediction intent. The intent is what tells the next delivery that a
    create may have left: lost, the image would be paid for twice. The worker does not send
    the create until a replica holds the intent, so the next delivery finds it, or finds no
    create to worry about."""
    plan = load_plan("typical_2x2")
    job_id = plan["job_id"]
    predictions = c.JobKeys(job_id).predictions
    stack.send(plan)
    held = tmp_path / "held"
    wait_for(held.exists, 60, f"the worker to reach {hold_at}")
    # The other three images go on to their creates; the held one is the fourth.
    wait_for(lambda: len(stack.replicate.creates) >= 3, 30, "the other images' creates")
    primary = stack.cluster.primary_port
    intents_before = {
        f for f in stack.cluster.node(primary).hkeys(predictions) if f.endswith(":intent")
    }
    creates_before = len(stack.replicate.creates)
    replica = stack.cluster.hold_back_replica()
    try:
        held.unlink()
        wait_for(
            lambda: any(
                f.endswith(":intent") and f not in intents_before
                for f in stack.cluster.node(primary).hkeys(predictions)
            ),
            30,
            "the held image's intent on the primary",
        )
        # Time for a create sent at once to reach the provider, as it would without the wait.
        time.sleep(0.5)
        assert stack.worker.process is not None
        os.killpg(stack.worker.process.pid, signal.SIGKILL)
        stack.cluster.kill_primary()
    finally:
        stack.cluster.resume(replica)
    assert len(stack.replicate.creates) == creates_before  # the create waited for the replica
    stack.cluster.wait_for_failover(primary)
    stack.standby()

    result = stack.result(job_id, timeout_s=150)
    assert_paid_once_and_complete(stack, plan, result)
