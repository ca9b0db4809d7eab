"""Job latency seen from outside, and where it goes: a 4-image job at 2 s per image, from the
moment it is sent to the moment its final event reaches a subscriber, ÷ the ideal.

- Local path: the ideal is one image plus its upload, measured in this process.
- Replicate path (the Replicate-like server, 2 s predictions): the ideal is one prediction
  through the official client, its download and its upload, measured in this process the
  same way; the jobs are also given against the prediction's bare 2 s.

Each path runs on a freshly started worker, untraced and then traced (OTLP/HTTP to a receiver
this script runs), ``ROUNDS`` jobs each, one at a time (each sent half a second after the one
before ended), the first job after the start included; the figure is their median. The traced
jobs give each stage's share of a job, from their spans, along the critical path: the image
whose outcome was recorded last. Each path runs once more, untraced, on the prefork pool, for
comparison with the default thread pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import httpx
import redis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from replicate.client import Client as ReplicateClient

from bench.common import cluster, figure, load_plan, table
from tasks import tracing as task_tracing
from tasks.harness import JobRunner
from tasks.localredis import RedisServer
from tests.fakes.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.fakes.replicate_server import FakeReplicate, PredictionPlan
from worker import constants as c
from worker import tracing
from worker.generation import GenerationRequest
from worker.generation.local import LocalImageGenerator
from worker.generation.replicate import check_png
from worker.pipeline import generation_request
from worker.planning import plan_job
from worker.settings import Settings
from worker.storage.local import LocalImageStore

LATENCY_S = 2.0
ROUNDS = int(os.environ.get("BENCH_LATENCY_ROUNDS", "3"))
TARGET = 1.02
IDLE_BETWEEN_JOBS_S = 0.5


@dataclass(frozen=True)
class Job:
    trace_id: str
    sent_ns: int
    final_ns: int

    @property
    def seconds(self) -> float:
        return (self.final_ns - self.sent_ns) / 1e9


def requests() -> list[GenerationRequest]:
    plan = load_plan("typical_2x2")
    settings = Settings(generator_backend="local", storage_backend="local")
    job = plan_job(
        str(plan["job_id"]), plan, None, max_images=50, per_minute=settings.budget_per_video_minute
    )
    return [generation_request(spec, 0, settings.image_timeout_s) for spec in job.images]


def alone(make: Callable[[GenerationRequest], bytes]) -> float:
    """The median time of ``make`` (one image's PNG) and the image's upload and signed link,
    one image at a time, in this process: what no design can beat."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalImageStore(Path(tmp))
        for request in requests()[:ROUNDS]:
            started = time.perf_counter()
            png = make(request)
            path = f"{request.job_id}/{request.image_key}.png"
            store.put_png(path, png)
            store.signed_url(path)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def local_ideal() -> float:
    """One image of the local generator and its upload."""
    generator = LocalImageGenerator(latency_s=LATENCY_S)
    return alone(lambda request: generator.generate(request).png)


def replicate_ideal() -> float:
    """One prediction through the official client, in sync mode as the worker creates it,
    then its download, its check and its upload, on connections already open (as the
    worker's are), measured as the local path's ideal is. The prediction itself takes
    ``LATENCY_S``."""
    version = Settings(generator_backend="local", storage_backend="local").model_version
    with replicate_env() as env, httpx.Client() as http:
        client = ReplicateClient(
            api_token=env["REPLICATE_API_TOKEN"], base_url=env["REPLICATE_BASE_URL"]
        )
        client.accounts.current()
        http.get(env["REPLICATE_BASE_URL"])  # the downloader's connection: any answer will do

        def predicted(request: GenerationRequest) -> bytes:
            prediction = client.predictions.create(
                version=version,
                input={"prompt": request.prompt, "seed": request.seed, "width": 1024},
                wait=60,
            )
            output = prediction.output
            png = http.get(str(output[0] if isinstance(output, list) else output)).content
            check_png(png)
            return png

        return alone(predicted)


def send(runner: JobRunner, traced: bool) -> Job:
    """Send a job as an upstream stage does (with a traceparent when traced) and time it to
    its final event, as a subscriber sees it."""
    plan = load_plan()
    job_id = str(plan["job_id"])
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    listener = redis.Redis.from_url(runner.redis_url, decode_responses=True).pubsub(  # type: ignore[no-untyped-call]
        ignore_subscribe_messages=True
    )
    listener.subscribe(c.events_channel(job_id))
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01"} if traced else {}
    sent_ns = time.time_ns()
    runner.client.send_task(
        c.TASK_START,
        kwargs={"job_id": job_id, "plan": plan, "duration_seconds": 180},
        headers=headers,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = listener.get_message(timeout=1.0)
        if message is None:
            continue
        body = json.loads(message["data"])
        if body["event_type"] == "stage_update" and body["data"]["status"] != "started":
            final_ns = time.time_ns()
            assert body["data"]["status"] == "completed", body
            break
    else:
        raise TimeoutError(f"job {job_id} did not end")
    listener.close()
    return Job(trace_id, sent_ns, final_ns)


@contextmanager
def replicate_env() -> Iterator[dict[str, str]]:
    token = "r8_" + secrets.token_hex(16)
    plan = PredictionPlan(duration=LATENCY_S, starting_for=0.5, predict_time=LATENCY_S - 0.5)
    with FakeReplicate(api_token=token, default_plan=plan) as fake:
        yield {
            "GENERATOR_BACKEND": "replicate",
            "REPLICATE_API_TOKEN": token,
            "REPLICATE_BASE_URL": fake.url,
        }


def run_path(
    path: str, traced: bool, receiver: OtlpReceiver, pool: str = "threads"
) -> tuple[list[Job], float]:
    """The jobs, and the worker's CPU time per job in milliseconds, from the job's send to its
    final event (what it spends after that, and its pool processes' with prefork, uncounted)."""
    with ExitStack() as stack:
        env = stack.enter_context(replicate_env()) if path == "replicate" else {}
        env.update(
            LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S),
            REFERENCE_GEN_CONCURRENCY="4",
            REFERENCE_GEN_POOL=pool,
        )
        if traced:
            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="200")
        runner, workers = stack.enter_context(cluster(1, **env))
        warm_sender(runner)
        assert workers[0].process is not None
        pid = workers[0].process.pid  # `refgen worker` runs Celery in its own process
        # A worker that has just answered its first ping, as after a deploy.
        jobs, cpu = [], 0
        for n in range(ROUNDS):
            if n:
                # The next job on a worker done with the one before: the final event leaves
                # from the last image's task, whose own end (its result stored, the chord
                # counted, the chord's finalize sent and run) takes 10-20 ms more, and a job
                # sent at once shared the worker with that.
                time.sleep(IDLE_BETWEEN_JOBS_S)
            before = cpu_ns(pid)
            jobs.append(send(runner, traced))
            cpu += cpu_ns(pid) - before
        return jobs, cpu / 1e6 / len(jobs)


def cpu_ns(pid: int) -> int:
    """The CPU time of a process's threads so far, in nanoseconds (the scheduler's own count,
    where ``/proc/{pid}/stat`` counts in 10 ms ticks). Its background threads' ticks are in it:
    about 2 ms a second here."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def warm_sender(runner: JobRunner) -> None:
    """The sender as a long-lived upstream stage is: its first publish ever (connection,
    queue declarations, Celery's message machinery) took 57 ms here, against 3 ms for the
    next ones, and is not the worker's. Sent to a queue that no worker reads, then removed."""
    queue = "refgen-bench-warmup"
    runner.client.send_task("refgen.bench.warmup", queue=queue, ignore_result=True)
    client = redis.Redis.from_url(runner.redis_url)
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    client.close()


# ------------------------------------------------------------------------------ breakdown
def checkpoints(job: Job, spans: list[ReceivedSpan]) -> list[tuple[str, int]] | None:
    """Times along the critical path, in order: each step's share is the gap to the last."""
    mine = [s for s in spans if s.trace_id == job.trace_id]
    named = {s.name: s for s in mine if s.name in ("refgen.start", "refgen.finalize")}
    records = [s for s in mine if s.name == "refgen.record"]
    if len(named) < 2 or not records:
        return None
    last = max(records, key=lambda s: s.end_ns)
    image = next(s for s in mine if s.span_id == last.parent_span_id)
    stages = sorted(
        (s for s in mine if s.parent_span_id == image.span_id and s.name != "refgen.finalize_now"),
        key=lambda s: s.start_ns,
    )
    # The job ends in the last image's own task (refgen.finalize_now), or in the chord's
    # finalize when that image's task could not end it.
    ended = min(s.start_ns for s in mine if s.name in ("refgen.finalize_now", "refgen.finalize"))
    generate = next((s for s in stages if s.name == "refgen.generate"), None)
    inside = sorted(
        (s for s in mine if generate and s.parent_span_id == generate.span_id),
        key=lambda s: s.start_ns,
    )
    start = named["refgen.start"]
    points = [
        ("sent → start picked up", start.start_ns),
        ("start (intake, chord sent) → the last image picked up", image.start_ns),
    ]
    for stage in stages:
        if stage.name == "refgen.generate" and inside:
            for part in inside:
                points.append((f"  {part.name.removeprefix('refgen.')}", part.end_ns))
        points.append((f"  {stage.name.removeprefix('refgen.')}", stage.end_ns))
    points += [
        ("recorded → the job's end begins", ended),
        # The final event leaves from inside it, before its span ends.
        ("the job's end, until its final event reaches the subscriber", job.final_ns),
    ]
    return points


def breakdown(jobs: list[Job], spans: list[ReceivedSpan]) -> list[tuple[str, float]]:
    """Median milliseconds per step over the traced jobs."""
    steps: dict[str, list[float]] = {}
    for job in jobs:
        points = checkpoints(job, spans)
        if points is None:
            continue
        previous = job.sent_ns
        for name, at in points:
            steps.setdefault(name, []).append((at - previous) / 1e6)
            previous = at
    return [(name, statistics.median(ms)) for name, ms in steps.items()]


def finalized(jobs: list[Job], spans: list[ReceivedSpan]) -> bool:
    ended = {s.trace_id for s in spans if s.name == "refgen.finalize"}
    return all(j.trace_id in ended for j in jobs)


def tracing_work_ms(jobs: int = 200) -> float:
    """What tracing itself adds to a job, in this process on a real Redis: every span of a
    4-image job (start, four images of five stages each, finalize with its links) through the
    worker's own signal handlers and the SDK's batch processor, and the trace hash's reads and
    writes. An upper bound on the job's added time: most of it runs in parallel, in the images."""

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def task(name: str, request: dict[str, Any], args: list[Any], body: Any = None) -> None:
        sent = SimpleNamespace(name=name, request=SimpleNamespace(**request))
        task_tracing._open_span(task_id=request["id"], task=sent, args=tuple(args), kwargs={})
        if body is not None:
            body()
        task_tracing._close_span(task_id=request["id"], state="SUCCESS")

    def one_job() -> None:
        job_id, headers = str(uuid.uuid4()), {}  # type: ignore[var-annotated]
        upstream = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        task(
            c.TASK_START,
            {"id": "s", "traceparent": upstream},
            [job_id],
            lambda: task_tracing._propagate(headers=headers),
        )
        for index in range(4):
            spec = {"job_id": job_id, "image_type": "scene", "image_id": f"i{index}"}
            task(c.TASK_GENERATE, {"id": f"i{index}", "retries": 0, **headers}, [spec], stages)
        task(c.TASK_FINALIZE, {"id": job_id}, [[], job_id])

    def stages() -> None:
        for stage in ("prepare", "generate", "ledger", "upload", "record"):
            with tracing.span(f"refgen.{stage}"):
                pass

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        built = SimpleNamespace(client=client, settings=SimpleNamespace(job_state_ttl_s=3600))
        tracing.install(TracerProvider(), [BatchSpanProcessor(Discard())])
        try:
            with patch.object(task_tracing, "services", lambda: built):
                for _ in range(20):
                    one_job()
                started = time.perf_counter()
                for _ in range(jobs):
                    one_job()
                return (time.perf_counter() - started) / jobs * 1000
        finally:
            tracing.shutdown()
            client.close()


def main() -> None:
    ideal = {"local": local_ideal(), "replicate": replicate_ideal()}
    rows: list[tuple[str, str]] = []
    shares: list[tuple[str, str]] = []
    cpu_rows: list[tuple[str, str]] = []
    with OtlpReceiver() as receiver:
        for path in ("local", "replicate"):
            ratios = {}
            for traced in (False, True):
                jobs, cpu_ms = run_path(path, traced, receiver)
                ratio = statistics.median(j.seconds for j in jobs) / ideal[path]
                label = "traced" if traced else "untraced"
                ratios[label] = ratio
                figure(f"worker_cpu_per_job_{path}_{label}", cpu_ms, "ms", rounds=ROUNDS)
                cpu_rows.append((f"{path}, {label}: the worker's CPU per job", f"{cpu_ms:.1f} ms"))
                figure(
                    f"job_latency_ratio_{path}_{label}",
                    ratio,
                    "x",
                    target=TARGET,
                    rounds=ROUNDS,
                    jobs_s=[round(j.seconds, 4) for j in jobs],
                    ideal_s=round(ideal[path], 4),
                )
                rows.append(
                    (
                        f"{path}, {label}: sent → final event ÷ ideal ({ideal[path]:.4f} s)",
                        f"{ratio:.3f} × (jobs: "
                        + ", ".join(f"{j.seconds:.3f}" for j in jobs)
                        + f" s; target ≤ {TARGET})",
                    )
                )
                if path == "replicate":
                    # The same jobs against the prediction's own time, which leaves out what
                    # the ideal above counts: the request, the download, the upload.
                    bare = statistics.median(j.seconds for j in jobs) / LATENCY_S
                    figure(f"job_latency_over_prediction_{label}", bare, "x", rounds=ROUNDS)
                    rows.append(
                        (f"  the same ÷ the prediction alone ({LATENCY_S:g} s)", f"{bare:.3f} ×")
                    )
                if traced:
                    receiver.wait_for(partial(finalized, jobs), 10)
                    steps = breakdown(jobs, receiver.received())
                    total = sum(ms for _, ms in steps)
                    shares.append(
                        (f"{path} path (median of {len(jobs)} traced jobs)", f"{total:.1f} ms")
                    )
                    shares += [
                        (f"  {name}", f"{ms:7.1f} ms  {ms / total:6.1%}") for name, ms in steps
                    ]
            figure(f"tracing_cost_{path}", ratios["traced"] / ratios["untraced"], "x", target=1.01)
            # The other pool an operator can choose (README: Configuration): its latency, for
            # the memory bench/memory.py measures it to cost.
            jobs, _ = run_path(path, False, receiver, pool="prefork")
            ratio = statistics.median(j.seconds for j in jobs) / ideal[path]
            figure(
                f"job_latency_ratio_{path}_prefork",
                ratio,
                "x",
                rounds=ROUNDS,
                jobs_s=[round(j.seconds, 4) for j in jobs],
            )
            rows.append(
                (
                    f"{path}, untraced, REFERENCE_GEN_POOL=prefork (4 processes)",
                    f"{ratio:.3f} × (jobs: " + ", ".join(f"{j.seconds:.3f}" for j in jobs) + " s)",
                )
            )
    work_ms = tracing_work_ms()
    figure(
        "tracing_work_per_job", work_ms, "ms", share_of_ideal=round(work_ms / 1000 / LATENCY_S, 5)
    )
    rows.append(
        (
            "tracing's own work per job (26 spans, the trace hash), in one process",
            f"{work_ms:.2f} ms = {work_ms / 10 / LATENCY_S:.2f} % of a 2 s job at most",
        )
    )
    table(
        f"Job latency from outside, 4 images at {LATENCY_S:g} s, median of {ROUNDS}",
        rows + cpu_rows,
    )
    table("Where a job's time goes, along its critical path (from the spans)", shares)


if __name__ == "__main__":
    main()
