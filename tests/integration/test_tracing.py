"""A job's trace from real workers: a real chord on the Replicate path (the Replicate-like
server), spans sent over OTLP/HTTP to a receiver this test runs; and no trace at all from a
worker without the OTEL_* variables."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasks.harness import JobRunner, WorkerProcess, local_worker_env, replicate_worker_env
from tasks.localredis import RedisServer
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.fakes.replicate_server import FakeReplicate
from worker import constants as c

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

UPSTREAM_TRACE = secrets.token_hex(16)
UPSTREAM_SPAN = secrets.token_hex(8)
TRACEPARENT = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
STAGES = {
    "refgen.prepare",
    "refgen.generate",
    "refgen.replicate.admission",
    "refgen.replicate.create",
    "refgen.replicate.wait",
    "refgen.replicate.download",
    "refgen.ledger",
    "refgen.upload",
    "refgen.record",
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def traced(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    """A traced worker of its own (own Redis, so the session's untraced worker takes none of
    its jobs), on the Replicate path."""
    token = "r8_" + secrets.token_hex(16)
    tmp = tmp_path_factory.mktemp("traced")
    with RedisServer() as broker, FakeReplicate(api_token=token) as fake:
        env = replicate_worker_env(broker.url, tmp / "storage", fake.url, token)
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_SERVICE_NAME="refgen-under-test",
            OTEL_BSP_SCHEDULE_DELAY="50",  # ms: spans leave soon after they end
        )
        runner = JobRunner(broker.url)
        worker = WorkerProcess(env, tmp / "worker.log", "traced").start(runner.client)
        try:
            yield runner
        finally:
            worker.stop()


def send_with_traceparent(runner: JobRunner, plan: dict, traceparent: str) -> dict:
    """As an upstream stage does (README: Tracing): the traceparent as a message header."""
    runner.client.send_task(
        c.TASK_START,
        kwargs={"job_id": plan["job_id"], "plan": plan, "duration_seconds": 180},
        headers={"traceparent": traceparent},
    )
    result: dict = runner.client.AsyncResult(plan["job_id"]).get(timeout=60)
    return result


def test_one_trace_per_job_and_finalize_links_every_image(
    traced: JobRunner, receiver: OtlpReceiver, load_plan
) -> None:
    plan = load_plan("typical_2x2")
    result = send_with_traceparent(traced, plan, TRACEPARENT)
    assert result["status"] == "success"

    def of_job(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == UPSTREAM_TRACE]

    assert receiver.wait_for(
        lambda spans: any(s.name == "refgen.finalize" for s in of_job(spans)), timeout_s=15
    )
    spans = of_job(receiver.received())
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)

    (start,) = named["refgen.start"]
    assert start.parent_span_id == UPSTREAM_SPAN
    assert start.attributes["refgen.job_id"] == plan["job_id"]
    assert start.resource["service.name"] == "refgen-under-test"

    images = named["refgen.image"]
    assert len(images) == 4
    assert {s.parent_span_id for s in images} == {start.span_id}
    assert {s.attributes["refgen.image_key"] for s in images} == {
        "scene_city_street",
        "scene_rooftop",
        "character_protagonist",
        "character_antagonist",
    }
    for image in images:
        children = {s.name for s in spans if s.parent_span_id == image.span_id}
        under_generate = {
            s.name
            for s in spans
            for g in spans
            if g.parent_span_id == image.span_id
            and g.name == "refgen.generate"
            and s.parent_span_id == g.span_id
        }
        stages = (children | under_generate) - {"refgen.finalize_now"}  # the job's end, below
        assert stages == STAGES, image.attributes["refgen.image_key"]

    (final,) = named["refgen.finalize"]
    assert final.parent_span_id == start.span_id
    assert {span_id for _, span_id in final.links} == {s.span_id for s in images}
    # The fan-in comes after every image's outcome was recorded (an image task's span itself
    # may end a moment after finalize begins: Celery hands the chord on before its postrun).
    assert len(named["refgen.record"]) == 4
    assert all(s.end_ns <= final.start_ns for s in named["refgen.record"])

    # The last image to record its outcome ended the job itself, inside its own span; the
    # chord's finalize came after and found it committed.
    (ended,) = named["refgen.finalize_now"]
    assert ended.attributes["refgen.cause"] == "last_image"
    assert any(ended.parent_span_id == s.span_id for s in images)
    assert ended.start_ns <= final.start_ns

    # Ids only: no prompt text, description or credential in anything sent.
    sent = b"".join(receiver.bodies)
    for secret in ("Rain-slicked", "cyberpunk", "r8_"):
        assert secret.encode() not in sent


def test_no_trace_without_the_otel_variables(worker: WorkerProcess, load_plan) -> None:
    """The session's shared worker has no OTEL_* variables: a job with a traceparent runs
    untraced, and nothing of a trace is written for it."""
    assert not any(k.startswith("OTEL_") for k in worker.env)
    plan = load_plan("typical_2x2")
    runner = JobRunner(worker.env["REDIS_URL"])
    result = send_with_traceparent(runner, plan, TRACEPARENT)
    assert result["status"] == "success"
    client = redis.Redis.from_url(worker.env["REDIS_URL"])
    assert client.exists(c.JobKeys(plan["job_id"]).meta)  # the job's own keys are there
    assert not client.exists(c.JobKeys(plan["job_id"]).trace)


def test_a_prefork_worker_traces_from_each_child(
    receiver: OtlpReceiver, tmp_path: Path, load_plan
) -> None:
    """Prefork: each child builds its own provider as it starts (worker_process_init); a
    provider built in the parent would have lost its export thread in the fork."""
    with RedisServer() as broker:
        env = local_worker_env(broker.url, tmp_path / "storage", latency_s=0.1)
        env.update(
            REFERENCE_GEN_POOL="prefork",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        runner = JobRunner(broker.url)
        worker = WorkerProcess(env, tmp_path / "prefork.log", "prefork").start(runner.client)
        try:
            plan = load_plan("typical_2x2")
            trace_id = secrets.token_hex(16)
            traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
            assert send_with_traceparent(runner, plan, traceparent)["status"] == "success"
            # The result is there once the last image ended the job; the chord's finalize
            # (and its span) comes just after.
            assert receiver.wait_for(
                lambda spans: any(
                    s.trace_id == trace_id and s.name == "refgen.finalize" for s in spans
                ),
                timeout_s=15,
            )
        finally:
            worker.stop()
    spans = [s for s in receiver.received() if s.trace_id == trace_id]
    images = {s.span_id for s in spans if s.name == "refgen.image"}
    (final,) = [s for s in spans if s.name == "refgen.finalize"]
    assert len(images) == 4 and {span_id for _, span_id in final.links} == images
