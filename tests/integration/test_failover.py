"""A Redis failover under a running job: one primary, one replica and three Sentinels (all real
``redis-server`` processes), real ``refgen worker`` and ``refgen gateway`` processes reaching
them through Sentinel, the Replicate-like server, and the primary SIGKILLed as a lost machine.

The job must end with the right result, read by job id through Sentinel; each image's
prediction created once; the recorded cost the sum of what the provider billed; and a browser's
SSE stream must carry on to the final event.
"""

from __future__ import annotations

import secrets
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

from tasks.harness import WorkerProcess, bare_client, base_worker_env
from tasks.localredis import free_port
from tests.fakes.replicate_server import FakeReplicate
from tests.integration.gatewaykit import Sse, running_gateway, wait_known
from tests.integration.sentinel import MASTER, SentinelCluster
from worker import constants as c
from worker.budget import from_nano, to_nano
from worker.services import redis_client
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PRICE = c.DEFAULT_HARDWARE_PRICE_PER_S
TOKEN = "r8_" + secrets.token_hex(16)


@dataclass
class Stack:
    cluster: SentinelCluster
    replicate: FakeReplicate
    client: Celery
    gateway: str
    worker: WorkerProcess

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
        FakeReplicate(api_token=TOKEN, duration_range=(2.0, 3.0), seed=3) as replicate,
    ):
        # REDIS_URL names a server that is not there: Sentinel must win over it.
        env = base_worker_env("redis://127.0.0.1:1/0", tmp_path / "storage")
        env.update(
            cluster.env(),
            REPLICATE_API_TOKEN=TOKEN,
            REPLICATE_BASE_URL=replicate.url,
            GENERATOR_BACKEND="replicate",
            STORAGE_BACKEND="local",
            LEASE_TTL_S="4",
            # Long enough for a test to kill the primary while a write waits for its replica.
            REDIS_WAIT_TIMEOUT_MS="5000",
        )
        if hold_at is not None:
            env.update(REFGEN_HOLD_AT=hold_at, REFGEN_HOLD_FILE=str(tmp_path / "held"))
        client = bare_client(cluster.celery_url, sentinel_master=MASTER)
        worker = WorkerProcess(env, tmp_path / "worker.log", "failover").start(client)
        try:
            with running_gateway(env, tmp_path / "gateway.log", free_port()) as gateway:
                yield Stack(cluster, replicate, client, gateway, worker)
        finally:
            worker.stop()
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in logs, logs[-4000:]
    assert cluster.password not in logs  # type: ignore[operator]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


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


def test_a_job_survives_its_primary_killed_with_predictions_in_flight(stack, load_plan) -> None:
    plan = load_plan("typical_2x2")
    stack.send(plan)
    sse = stack.watch(plan["job_id"])
    wait_for(lambda: len(stack.replicate.creates) >= 2, 30, "predictions in flight")
    old = stack.cluster.kill_primary()
    stack.cluster.wait_for_failover(old)

    result = stack.result(plan["job_id"])
    assert_paid_once_and_complete(stack, plan, result)
    final = sse().messages[-1]
    assert final["event_type"] == "stage_update" and final["data"]["status"] == "completed"
    assert Decimal(final["data"]["total_cost"]) == Decimal(result["total_cost"])


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
    """The worst moments: the worker is held just before the write, the replica is paused,
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
    replica = stack.cluster.replica_port
    assert primary == stack.cluster.primary_port
    stack.cluster.pause(replica)
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
